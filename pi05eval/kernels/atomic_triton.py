"""Denoise GEMMs whose split-K partials meet in an fp32 buffer by atomic adds (`ExpertKernelConfig.atomic_residual`).

In `expert_triton` the O and down projections end in a dependent tail: every K split stores its partial, arrives at
a counter (acquire-release), and the tile's last program reads the partials back and updates the residual stream
in place. Here that tail moves into the kernel that reads the stream next, which loads whole rows anyway:

* `gemm_accumulate_kernel`     split-K GEMM; every program adds its fp32 partial into acc [M, N] with relaxed atomic
                               adds that nothing waits on (one split: a plain store), and the split-0 programs zero
                               their tile of the *other* accumulator, whose reader has finished.
* `residual_norm_gemm_kernel`  applies the pending gated residual to its rows, h = round(h + round(round(acc) *
                               gate)) (the roundings of `gemm_residual_kernel`), the programs of column tile 0 write
                               that h to the other residual buffer, then adaRMS + GEMM + pair epilogue exactly as
                               `norm_gemm_kernel` with one split.

Two residual buffers alternate (the Q/K/V kernel reads one and writes the other, the gate|up kernel the reverse),
so no program overwrites rows another program of its launch still reads. The atomics add in arrival order: the
result is the same math up to fp32 summation order, but not bitwise equal run to run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from pi05eval.kernels.expert_triton import (
    _pair_epilogue,
    _rnd,
    _rope_tables,
    ada_rms_norm,
    block_m,
    dot_precision,
    norm_gemm_args,
    pdl_options,
)


@triton.jit
def apply_pending(h, acc_ptr, gate, rm, rk, row_ok, D: tl.constexpr):
    """h [BM, KS] (act, columns rk of D) + round(round(acc) * gate): the residual a `gemm_accumulate_kernel` left in
    acc fp32 [M, D]; gate [1, KS] fp32, already rounded to the activation dtype."""
    acc = tl.load(acc_ptr + rm[:, None] * D + rk[None, :], mask=row_ok[:, None], other=0.0, cache_modifier=".cg")
    return (h.to(tl.float32) + _rnd(_rnd(acc, h.dtype) * gate, h.dtype)).to(h.dtype)


@triton.jit
def residual_norm_gemm_kernel(
    h_ptr,  # [M, D] act: residual stream without the pending residual
    mod_ptr,  # fp32 [3D]: (scale | shift | gate) of this adaRMS norm
    w_ptr,  # [N, D] act: pair-interleaved weight
    out_ptr,  # [M, OUT_N] act
    acc_ptr,  # fp32 [M, D]: the pending residual's sums (APPLY)
    gate_ptr,  # fp32 [D]: its adaRMS gate (APPLY)
    h_out_ptr,  # [M, D] act: the stream with it applied (written by column tile 0)
    cos_ptr,  # [B, 1, L, HD] act (ROPE only)
    sin_ptr,
    M,
    L,
    cs_stride_b,
    cs_stride_l,
    eps,
    D: tl.constexpr,
    N: tl.constexpr,
    OUT_N: tl.constexpr,
    HD: tl.constexpr,
    ROPE_N: tl.constexpr,
    GEGLU: tl.constexpr,
    APPLY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    act = w_ptr.dtype.element_ty
    if USE_PDL:
        gdc_launch_dependents()
    n0 = tl.program_id(0) * BLOCK_N
    rm = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)  # grid (N / BLOCK_N, 1, row blocks)
    row_ok = rm < M
    rk = tl.arange(0, D)
    # inputs no kernel of the step writes: weight tile, modulation, the pending residual's gate, RoPE tables
    w = tl.load(w_ptr + (n0 + tl.arange(0, BLOCK_N))[:, None] * D + rk[None, :])
    scale = tl.load(mod_ptr + rk)[None, :]
    shift = tl.load(mod_ptr + D + rk)[None, :]
    gate = 0.0
    if APPLY:
        gate = _rnd(tl.load(gate_ptr + rk), act)[None, :]
    cos1, sin1, cos2, sin2 = _rope_tables(
        cos_ptr, sin_ptr, rm, row_ok, n0, L, cs_stride_b, cs_stride_l, HD, BLOCK_N, GEGLU
    )
    if USE_PDL:
        gdc_wait()  # the kernels that wrote h, acc (and read h_out) are complete
    hp = rm[:, None] * D + rk[None, :]
    h = tl.load(h_ptr + hp, mask=row_ok[:, None], other=0.0)
    if APPLY:
        h = apply_pending(h, acc_ptr, gate, rm, rk, row_ok, D)
    if tl.program_id(0) == 0:
        tl.store(h_out_ptr + hp, h, mask=row_ok[:, None])
    xn = ada_rms_norm(h, mod_ptr, rk, D, eps, scale, shift, False)
    y = _rnd(tl.dot(xn, tl.trans(w), input_precision=DOT_PREC), act)
    _pair_epilogue(y, rm, row_ok, n0, out_ptr, cos1, sin1, cos2, sin2, OUT_N, HD, ROPE_N, GEGLU, BLOCK_M, BLOCK_N)


@triton.jit
def gemm_accumulate_kernel(
    a_ptr,  # [M, K] act
    w_ptr,  # [N, K] act (nn.Linear weight)
    acc_ptr,  # fp32 [M, N]: += a @ w.T (zero before the launch unless SPLIT_K == 1, which overwrites it)
    zero_ptr,  # fp32 [M, N]: the other accumulator, zeroed here (its reader is complete)
    M,
    K: tl.constexpr,
    N: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    if USE_PDL:
        gdc_launch_dependents()
    pid_k = tl.program_id(1)
    rm = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * (K // SPLIT_K) + tl.arange(0, K // SPLIT_K)
    row_ok = rm < M
    w = tl.load(w_ptr + rn[:, None] * K + rk[None, :])  # this program's K slice of the weight tile
    if USE_PDL:
        gdc_wait()  # the kernel that wrote a, and every reader of zero_ptr, is complete
    a = tl.load(a_ptr + rm[:, None] * K + rk[None, :], mask=row_ok[:, None], other=0.0)
    part = tl.dot(a, tl.trans(w), input_precision=DOT_PREC)  # [BLOCK_M, BLOCK_N] fp32
    off = rm[:, None] * N + rn[None, :]
    if SPLIT_K == 1:
        tl.store(acc_ptr + off, part, mask=row_ok[:, None])
    else:
        tl.atomic_add(acc_ptr + off, part, mask=row_ok[:, None], sem="relaxed")
    if pid_k == 0:
        tl.store(zero_ptr + off, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), mask=row_ok[:, None])


def launch_residual_norm_gemm(
    h: torch.Tensor,
    pending: tuple[torch.Tensor, torch.Tensor] | None,
    h_out: torch.Tensor,
    mod: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    *,
    horizon: int,
    eps: float,
    bn: int,
    warps: int,
    pdl: bool,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    head_dim: int = 0,
    rope_cols: int = 0,
) -> None:
    """h_out = h + pending residual; out = epilogue(adaRMS(h_out; mod) @ w.T): RoPE pairs when `cos` is given, else
    GeGLU pairs (as `launch_norm_gemm` with split 1).

    h, h_out [M, D] (distinct buffers); pending: (acc fp32 [M, D], gate fp32 [D]) of a `launch_gemm_accumulate`, or
    None (h_out = h); mod fp32 [3D]; w [N, D] interleaved; out, cos, sin as `launch_norm_gemm`.
    """
    grid, args, consts = norm_gemm_args(h, mod, w, out, h, h, horizon, eps, bn, 1, cos, sin, head_dim, rope_cols)
    del consts["SPLIT_K"]
    acc, gate = pending if pending is not None else (h, mod)  # placeholders, not read
    residual_norm_gemm_kernel[grid](
        *args[:4], acc, gate, h_out, *args[6:], **consts, APPLY=pending is not None, num_warps=warps,
        **pdl_options(pdl),
    )  # fmt: skip


def launch_gemm_accumulate(
    a: torch.Tensor, w: torch.Tensor, acc: torch.Tensor, zero: torch.Tensor, *, bn: int, split: int, warps: int,
    pdl: bool,
) -> None:  # fmt: skip
    """acc [M, N] += a [M, K] @ w [N, K].T (split == 1: acc = ...), fp32; zero [M, N] fp32 is zeroed."""
    m, k = a.shape
    n = w.shape[0]
    bm = block_m(m)
    gemm_accumulate_kernel[(n // bn, split, triton.cdiv(m, bm))](
        a, w, acc, zero, m, K=k, N=n, SPLIT_K=split, BLOCK_M=bm, BLOCK_N=bn, DOT_PREC=dot_precision(w.dtype),
        num_warps=warps, **pdl_options(pdl),
    )  # fmt: skip
