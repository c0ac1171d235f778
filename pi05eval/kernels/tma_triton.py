"""Shared-memory variants of the two GEMM kernels of an expert layer (same math and epilogues as `expert_triton`).

`expert_triton`'s kernels hold a program's whole weight tile in registers (~250 per thread for gate|up), so one
program fills an SM's register file and the next kernel's programs cannot start loading their weights until it
exits. Here the tile goes to shared memory in one TMA copy issued before the PDL wait, and the MMA reads it from
there (Hopper's wgmma): ~40-90 registers per thread, and the next kernel's programs fit beside the running ones.

A TMA box is at most 256 elements per side, so the weight is re-laid once (`relay_tiles`): the K slice of a program
(its whole row for the norm kernel, a split of it for the residual one) is cut into NCH chunks of BLOCK_K columns
stacked as rows, [NCH * BLOCK_N, BLOCK_K], one box. The activation rows, loaded after the wait, are re-arranged into
their NCH chunks side by side, [BLOCK_K, NCH * BLOCK_M] (`_side_by_side`); one MMA gives every (weight chunk,
activation chunk) product and the diagonal blocks summed are the tile's result (`_diagonal_sum`; the off-diagonal
work is ~10 rows wide, cheap).

Measured on an H200 it loses (benchmarks/README.md, "Weight tiles in shared memory"): the bare GEMMs are faster than
the register kernels', but with the epilogues the 10-step denoise takes 5.18 ms against 4.64 ms, so
`ExpertKernelConfig.tma` is off by default.

* `norm_gemm_tma_kernel`      adaRMS + GEMM + RoPE / GeGLU pairs, as `norm_gemm_kernel` (whole rows, no split-K);
* `gemm_residual_tma_kernel`  split-K GEMM + gated residual, as `gemm_residual_kernel` (last program combines).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from pi05eval.kernels.expert_triton import (
    NORM_BLOCK_M,
    _gated_residual,
    _pair_epilogue,
    _rnd,
    _rope_tables,
    ada_rms_norm,
    block_m,
    dot_precision,
    pdl_options,
    rope_args,
)

BOX = 256  # the largest TMA box side


@triton.jit
def _side_by_side(x, NCH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """x [BLOCK_M, NCH * BLOCK_K] -> its NCH column chunks side by side, transposed: [BLOCK_K, NCH * BLOCK_M] with
    column c * BLOCK_M + m = chunk c of row m (the MMA's B operand against the stacked weight chunks)."""
    return tl.reshape(tl.permute(tl.reshape(x, [BLOCK_M, NCH, BLOCK_K]), [2, 1, 0]), [BLOCK_K, NCH * BLOCK_M])


@triton.jit
def _diagonal_sum(p, NCH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """p [NCH * BLOCK_N, NCH * BLOCK_M] (block (c, c') = weight chunk c times activation chunk c') -> the sum of its
    diagonal blocks, transposed: [BLOCK_M, BLOCK_N] fp32."""
    if NCH == 1:
        acc = p
    else:
        c = tl.arange(0, NCH)
        diag = c[:, None, None, None] == c[None, None, :, None]
        acc = tl.sum(tl.sum(tl.where(diag, tl.reshape(p, [NCH, BLOCK_N, NCH, BLOCK_M]), 0.0), axis=2), axis=0)
    return tl.trans(acc)


@triton.jit
def norm_gemm_tma_kernel(
    h_ptr,  # [M, D] act: residual stream
    mod_ptr,  # fp32 [3D]: (scale | shift | gate) of this adaRMS norm
    w_desc,  # TMA descriptor of the re-laid pair-interleaved weight [N / BLOCK_N * NCH * BLOCK_N, BLOCK_K] act
    out_ptr,  # [M, OUT_N] act
    cos_ptr,  # [B, 1, L, HD] act (ROPE only)
    sin_ptr,
    M,
    L,
    cs_stride_b,
    cs_stride_l,
    eps,
    D: tl.constexpr,
    OUT_N: tl.constexpr,
    HD: tl.constexpr,
    ROPE_N: tl.constexpr,
    GEGLU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PREC: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    act = h_ptr.dtype.element_ty
    if USE_PDL:
        gdc_launch_dependents()
    NCH: tl.constexpr = D // BLOCK_K
    n0 = tl.program_id(0) * BLOCK_N
    row0 = tl.program_id(2) * BLOCK_M
    rm = row0 + tl.arange(0, BLOCK_M)
    row_ok = rm < M
    w = w_desc.load([tl.program_id(0) * NCH * BLOCK_N, 0])  # [NCH * BN, BK] into shared memory
    rd = tl.arange(0, D)
    scale = tl.load(mod_ptr + rd)[None, :]
    shift = tl.load(mod_ptr + D + rd)[None, :]
    cos1, sin1, cos2, sin2 = _rope_tables(
        cos_ptr, sin_ptr, rm, row_ok, n0, L, cs_stride_b, cs_stride_l, HD, BLOCK_N, GEGLU
    )
    if USE_PDL:
        gdc_wait()  # the previous kernel (which wrote h) is complete
    h = tl.load(h_ptr + rm[:, None] * D + rd[None, :], mask=row_ok[:, None], other=0.0)
    xn = ada_rms_norm(h, mod_ptr, rd, D, eps, scale, shift, False)  # [BM, D], every program normalizes its rows
    y = _diagonal_sum(tl.dot(w, _side_by_side(xn, NCH, BLOCK_M, BLOCK_K), input_precision=DOT_PREC), NCH, BLOCK_N,
                      BLOCK_M)  # fmt: skip
    _pair_epilogue(_rnd(y, act), rm, row_ok, n0, out_ptr, cos1, sin1, cos2, sin2, OUT_N, HD, ROPE_N, GEGLU,
                   BLOCK_M, BLOCK_N)  # fmt: skip


@triton.jit
def gemm_residual_tma_kernel(
    a_ptr,  # [M, K] act
    w_desc,  # TMA descriptor of the re-laid weight [N / BLOCK_N * SPLIT_K * NCH * BLOCK_N, BLOCK_K] act
    h_ptr,  # [M, N] act residual stream, updated in place
    gate_ptr,  # fp32 [N]
    ws_ptr,  # fp32 [SPLIT_K, grid_m * BLOCK_M, N] (SPLIT_K > 1)
    cnt_ptr,  # int32 [grid_m * grid_n], zero between launches (SPLIT_K > 1)
    M,
    K: tl.constexpr,
    N: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PREC: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    act = h_ptr.dtype.element_ty
    if USE_PDL:
        gdc_launch_dependents()
    KS: tl.constexpr = K // SPLIT_K
    NCH: tl.constexpr = KS // BLOCK_K
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row0 = tl.program_id(2) * BLOCK_M
    rm = row0 + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rm < M
    w = w_desc.load([(pid_n * SPLIT_K + pid_k) * NCH * BLOCK_N, 0])  # [NCH * BN, BK] into shared memory
    gate = _rnd(tl.load(gate_ptr + rn), act)[None, :]
    if USE_PDL:
        gdc_wait()  # the previous kernel (which wrote a) is complete
    a = tl.load(a_ptr + rm[:, None] * K + pid_k * KS + tl.arange(0, KS)[None, :], mask=row_ok[:, None], other=0.0)
    acc = _diagonal_sum(tl.dot(w, _side_by_side(a, NCH, BLOCK_M, BLOCK_K), input_precision=DOT_PREC), NCH, BLOCK_N,
                        BLOCK_M)  # fmt: skip
    _gated_residual(acc, h_ptr, gate, ws_ptr, cnt_ptr, rm, rn, row_ok, N, SPLIT_K, BLOCK_M, BLOCK_N)


def tile_chunk(k_slice: int, bn: int, bk: int) -> int:
    """BLOCK_K of a program's K slice: at most bk, dividing the slice, and with slice / BLOCK_K chunks of bn rows in one
    TMA box (<= BOX rows)."""
    chunk = max(16, min(bk, k_slice, BOX))
    while k_slice % chunk or (k_slice // chunk) * bn > BOX:
        chunk *= 2
        if chunk > min(k_slice, BOX):
            raise ValueError(f"no TMA box holds a {bn} x {k_slice} weight tile (bn * K slice <= {BOX} x {BOX})")
    return chunk


def relay_tiles(w: torch.Tensor, bn: int, split: int, bk: int) -> torch.Tensor:
    """[N, K] -> [N / bn * split * nch * bn, bk]: program (n tile, split)'s nch = K / split / bk chunks stacked as
    rows, chunk-major: one TMA box per program."""
    n, k = w.shape
    nch = k // split // bk
    return w.view(n // bn, bn, split, nch, bk).permute(0, 2, 3, 1, 4).reshape(-1, bk).contiguous()


class TmaWeight:
    """A weight re-laid for one (bn, split) tiling and its TMA descriptor (kept together: the descriptor holds the
    re-laid tensor's address)."""

    def __init__(self, w: torch.Tensor, bn: int, split: int, bk: int) -> None:
        from triton.tools.tensor_descriptor import TensorDescriptor

        n, k = w.shape
        if n % bn or k % split:
            raise ValueError(f"a {n} x {k} weight does not tile into {bn} rows x {split} splits")
        self.n, self.k, self.bn, self.split = n, k, bn, split
        self.bk = tile_chunk(k // split, bn, bk)
        self.relaid = relay_tiles(w, bn, split, self.bk)
        self.desc = TensorDescriptor.from_tensor(self.relaid, [k // split // self.bk * bn, self.bk])


def launch_norm_gemm_tma(
    h: torch.Tensor,
    mod: torch.Tensor,
    w: TmaWeight,
    out: torch.Tensor,
    *,
    horizon: int,
    eps: float,
    warps: int,
    pdl: bool,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    head_dim: int = 0,
    rope_cols: int = 0,
) -> None:
    """As `launch_norm_gemm` without split-K (same result): h [M, D], mod fp32 [3D], w re-laid with split 1."""
    m, d = h.shape
    if w.split != 1 or w.k != d:
        raise ValueError(f"norm_gemm_tma needs a whole-row tiling of a [N, {d}] weight (split 1)")
    bm = block_m(m, NORM_BLOCK_M)
    rope = cos is not None
    cs, sn, stride_b, stride_l = rope_args(h, cos, sin)
    norm_gemm_tma_kernel[(w.n // w.bn, 1, triton.cdiv(m, bm))](
        h, mod, w.desc, out, cs, sn, m, horizon, stride_b, stride_l, eps,
        D=d, OUT_N=out.shape[1], HD=head_dim if rope else 2, ROPE_N=rope_cols, GEGLU=not rope, BLOCK_M=bm,
        BLOCK_N=w.bn, BLOCK_K=w.bk, DOT_PREC=dot_precision(h.dtype), num_warps=warps, **pdl_options(pdl),
    )  # fmt: skip


def launch_gemm_residual_tma(
    a: torch.Tensor,
    w: TmaWeight,
    h: torch.Tensor,
    gate: torch.Tensor,
    ws: torch.Tensor,
    counters: torch.Tensor,
    *,
    warps: int,
    pdl: bool,
) -> None:
    """As `launch_gemm_residual` (same result): h += round(round(a @ w.T) * round(gate)), w re-laid."""
    m, k = a.shape
    if w.k != k:
        raise ValueError(f"weight K {w.k} != activation K {k}")
    bm = block_m(m)
    gemm_residual_tma_kernel[(w.n // w.bn, w.split, triton.cdiv(m, bm))](
        a, w.desc, h, gate, ws, counters, m, K=k, N=w.n, SPLIT_K=w.split, BLOCK_M=bm, BLOCK_N=w.bn, BLOCK_K=w.bk,
        DOT_PREC=dot_precision(a.dtype), num_warps=warps, **pdl_options(pdl),
    )  # fmt: skip
