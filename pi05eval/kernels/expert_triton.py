"""Triton GEMM kernels of one action-expert layer at small M (M = B * H action tokens, ~10 rows).

Two kernels cover the four projections of a layer (the attention kernel is in `attention_triton.py`):

* `norm_gemm_kernel`      adaRMS prologue + GEMM + pair epilogue. Every program recomputes its rows' mean of squares
                          (the rows are tiny), normalizes `h * rstd * (1 + scale) + shift` in fp32, rounds it to the
                          activation dtype and multiplies it by a tile of a *pair-interleaved* weight (`config.py`):
                          columns 2j and 2j + 1 of every tile are a pair, split apart in the epilogue:
                          - ROPE:  (d, d + hd/2) of one head -> q/k rotated (v heads unrotated), written to qkv;
                          - GEGLU: (gate j, up j) -> gelu_tanh(gate) * up, written to the MLP activation.
* `gemm_residual_kernel`  split-K GEMM + gated residual: `h += round(round(a @ w.T) * gate)` in place. Each program
                          stores its fp32 partial; the last program of an output tile to arrive (an atomic counter,
                          reset by that program) sums the partials in a fixed order (deterministic) and applies the
                          epilogue, so one launch does the whole projection.

Every program loads its whole weight tile (all of K, or its K split) at once, before waiting for the previous kernel
(programmatic dependent launch, `pdl`): the weights stream from HBM while the previous kernel finishes. Rounding
follows the PyTorch path op by op: GEMM outputs, gelu, products with the gate and residual sums are rounded to the
activation dtype where PyTorch produces a tensor of that dtype; accumulation and norms are fp32. All tensors are
row-major and contiguous in their last dimension.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from pi05eval.kernels.prefetch import l2_prefetch, prefetch_args


@triton.jit
def _rnd(x, dtype: tl.constexpr):
    """Round fp32 values to `dtype` and back: what a PyTorch op producing a `dtype` tensor does."""
    return x.to(dtype).to(tl.float32)


@triton.jit
def ada_rms_norm(h, mod_ptr, rk, D: tl.constexpr, eps, scale, shift, MOD_LATE: tl.constexpr):
    """AdaRMSNorm of rows h [BM, D] (act): round(h * rsqrt(mean(h^2) + eps) * (1 + scale) + shift), fp32 math.
    scale / shift [1, D] fp32 were loaded already, or (MOD_LATE) are loaded here from mod_ptr (+ rk)."""
    ss = tl.sum(h.to(tl.float32) * h.to(tl.float32), axis=1)
    rstd = 1.0 / tl.sqrt(ss / D + eps)
    return norm_slice(h, rstd, mod_ptr, rk, D, scale, shift, MOD_LATE)


@triton.jit
def norm_slice(h, rstd, mod_ptr, rk, D: tl.constexpr, scale, shift, MOD_LATE: tl.constexpr):
    """`ada_rms_norm` of a column slice h [BM, KS] (columns rk) given the whole rows' rstd [BM] (fp32 math)."""
    if MOD_LATE:
        scale = tl.load(mod_ptr + rk)[None, :]
        shift = tl.load(mod_ptr + D + rk)[None, :]
    return (h.to(tl.float32) * rstd[:, None] * (1.0 + scale) + shift).to(h.dtype)


@triton.jit
def geglu_rounded(gate, up, act: tl.constexpr):
    """gelu_tanh(gate) * up in act with the PyTorch path's roundings, for fp32 gate / up already rounded to act."""
    inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
    gelu = _rnd(gate / (1.0 + tl.exp(-2.0 * inner)), act)  # 0.5 g (1 + tanh(inner)) = g * sigmoid(2 inner)
    return (gelu * up).to(act)


@triton.jit
def _pair_epilogue(
    y, rm, row_ok, n0, out_ptr, cos1, sin1, cos2, sin2,
    OUT_N: tl.constexpr, HD: tl.constexpr, ROPE_N: tl.constexpr, GEGLU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Split the pair-interleaved columns of y [BLOCK_M, BLOCK_N] (rounded GEMM output) and store RoPE / GeGLU."""
    act = out_ptr.dtype.element_ty
    ri = tl.arange(0, BLOCK_N // 2)
    a, b = tl.split(tl.reshape(y, [BLOCK_M, BLOCK_N // 2, 2]))
    if GEGLU:  # a = gate, b = up
        cols = n0 // 2 + ri
        tl.store(out_ptr + rm[:, None] * OUT_N + cols[None, :], geglu_rounded(a, b, act), mask=row_ok[:, None])
    else:  # a = column d, b = column d + hd/2 of one head: x * cos + [-x2, x1] * sin on q and k heads
        c1 = (n0 // HD) * HD + (n0 % HD) // 2 + ri
        rope = n0 < ROPE_N
        a, b = tl.where(rope, a * cos1 - b * sin1, a), tl.where(rope, b * cos2 + a * sin2, b)
        out = out_ptr + rm[:, None] * OUT_N + c1[None, :]
        tl.store(out, a.to(act), mask=row_ok[:, None])
        tl.store(out + HD // 2, b.to(act), mask=row_ok[:, None])


@triton.jit
def _rope_tables(cos_ptr, sin_ptr, rm, row_ok, n0, L, cs_stride_b, cs_stride_l, HD: tl.constexpr,
                 BLOCK_N: tl.constexpr, GEGLU: tl.constexpr):  # fmt: skip
    """cos / sin [BM, BN / 2] fp32 at the two halves (d, d + hd/2) of a pair-interleaved RoPE tile's columns (GEGLU:
    zeros, unused)."""
    cos1, sin1, cos2, sin2 = 0.0, 0.0, 0.0, 0.0
    if not GEGLU:
        c1 = (n0 // HD) * HD + (n0 % HD) // 2 + tl.arange(0, BLOCK_N // 2)  # output columns of the pairs' first halves
        cs = (rm // L)[:, None] * cs_stride_b + (rm % L)[:, None] * cs_stride_l + (c1 % HD)[None, :]
        cos1 = tl.load(cos_ptr + cs, mask=row_ok[:, None], other=0.0).to(tl.float32)
        sin1 = tl.load(sin_ptr + cs, mask=row_ok[:, None], other=0.0).to(tl.float32)
        cos2 = tl.load(cos_ptr + cs + HD // 2, mask=row_ok[:, None], other=0.0).to(tl.float32)
        sin2 = tl.load(sin_ptr + cs + HD // 2, mask=row_ok[:, None], other=0.0).to(tl.float32)
    return cos1, sin1, cos2, sin2


@triton.jit
def _split_k_total(acc, ws_ptr, cnt_ptr, rm, rn, N: tl.constexpr, SPLIT_K: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Store this program's partial acc [BM, BN]; -> (is the tile's last program, the sum of all partials if so).

    Grid (n tiles, SPLIT_K, m blocks); ws fp32 [SPLIT_K, grid_m * BLOCK_M, N]; the last program of a tile (an
    arrival counter, reset by it) sums the partials in split order, so the result is deterministic."""
    part = tl.num_programs(2) * BLOCK_M * N  # one split's partials
    ws = ws_ptr + rm[:, None] * N + rn[None, :]
    tl.store(ws + tl.program_id(1) * part, acc)
    tl.debug_barrier()  # every thread's partial is written before the (release) arrival
    tile = tl.program_id(2) * tl.num_programs(0) + tl.program_id(0)
    arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
    last = arrived == SPLIT_K - 1
    total = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if last:
        for s in tl.static_range(SPLIT_K):
            total += tl.load(ws + s * part, cache_modifier=".cg")
        tl.store(cnt_ptr + tile, 0)
    return last, total


@triton.jit
def norm_gemm_kernel(
    h_ptr,  # [M, D] act: residual stream
    mod_ptr,  # fp32 [3D]: (scale | shift | gate) of this adaRMS norm, shared by the batch
    w_ptr,  # [N, D] act: pair-interleaved weight
    out_ptr,  # [M, OUT_N] act
    ws_ptr,  # fp32 [SPLIT_K, grid_m * BLOCK_M, N] partial sums (SPLIT_K > 1)
    cnt_ptr,  # int32 [grid_m * grid_n] arrival counters, zero between launches (SPLIT_K > 1)
    cos_ptr,  # [B, 1, L, HD] act (ROPE only)
    sin_ptr,
    M,
    L,
    cs_stride_b,
    cs_stride_l,
    eps,
    pf_ptr,  # a later kernel's weight, prefetched into L2 (PREFETCH)
    pf_numel,
    pf_chunk,
    D: tl.constexpr,
    N: tl.constexpr,
    OUT_N: tl.constexpr,
    HD: tl.constexpr,
    ROPE_N: tl.constexpr,  # ROPE: the first ROPE_N columns (q and k heads) are rotated
    GEGLU: tl.constexpr,
    SPLIT_K: tl.constexpr,  # programs sharing an output tile, each over D / SPLIT_K of the normalized row
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,  # "ieee" for fp32 operands (no TF32); ignored for 16-bit ones
    MOD_LATE: tl.constexpr,
    USE_PDL: tl.constexpr,
    PREFETCH: tl.constexpr,
    PF_ELEM: tl.constexpr,
    PF_THREADS: tl.constexpr,
    PF_AT: tl.constexpr,  # issue the prefetch at the start (0), after the wait (1) or at the end (2)
):
    act = w_ptr.dtype.element_ty
    if USE_PDL:
        gdc_launch_dependents()
    if PREFETCH and PF_AT == 0:
        l2_prefetch(pf_ptr, pf_numel, pf_chunk, PF_ELEM, PF_THREADS)
    n0 = tl.program_id(0) * BLOCK_N
    pid_k = tl.program_id(1)
    rm = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rm < M
    KS: tl.constexpr = D // SPLIT_K
    rk = pid_k * KS + tl.arange(0, KS)  # this program's slice of the reduction
    # inputs no kernel of the step writes: the weight tile, the modulation, RoPE tables
    w = tl.load(w_ptr + (n0 + tl.arange(0, BLOCK_N))[:, None] * D + rk[None, :])
    scale, shift = 0.0, 0.0
    if not MOD_LATE:
        scale = tl.load(mod_ptr + rk)[None, :]
        shift = tl.load(mod_ptr + D + rk)[None, :]
    cos1, sin1, cos2, sin2 = _rope_tables(
        cos_ptr, sin_ptr, rm, row_ok, n0, L, cs_stride_b, cs_stride_l, HD, BLOCK_N, GEGLU
    )
    if USE_PDL:
        gdc_wait()  # the previous kernel (which wrote h) is complete
    if PREFETCH and PF_AT == 1:
        l2_prefetch(pf_ptr, pf_numel, pf_chunk, PF_ELEM, PF_THREADS)
    if SPLIT_K == 1:
        h = tl.load(h_ptr + rm[:, None] * D + rk[None, :], mask=row_ok[:, None], other=0.0)
        xn = ada_rms_norm(h, mod_ptr, rk, D, eps, scale, shift, MOD_LATE)  # every program normalizes its rows
        y = _rnd(tl.dot(xn, tl.trans(w), input_precision=DOT_PREC), act)  # the projection's output dtype
        _pair_epilogue(y, rm, row_ok, n0, out_ptr, cos1, sin1, cos2, sin2, OUT_N, HD, ROPE_N, GEGLU, BLOCK_M,
                       BLOCK_N)  # fmt: skip
    else:
        rd = tl.arange(0, D)
        hf = tl.load(h_ptr + rm[:, None] * D + rd[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=1) / D + eps)  # the whole row's mean of squares
        h = tl.load(h_ptr + rm[:, None] * D + rk[None, :], mask=row_ok[:, None], other=0.0)
        xn = norm_slice(h, rstd, mod_ptr, rk, D, scale, shift, MOD_LATE)
        acc = tl.dot(xn, tl.trans(w), input_precision=DOT_PREC)
        rn = n0 + tl.arange(0, BLOCK_N)
        last, total = _split_k_total(acc, ws_ptr, cnt_ptr, rm, rn, N, SPLIT_K, BLOCK_M, BLOCK_N)
        if last:
            _pair_epilogue(_rnd(total, act), rm, row_ok, n0, out_ptr, cos1, sin1, cos2, sin2, OUT_N, HD, ROPE_N,
                           GEGLU, BLOCK_M, BLOCK_N)  # fmt: skip
    if PREFETCH and PF_AT == 2:
        l2_prefetch(pf_ptr, pf_numel, pf_chunk, PF_ELEM, PF_THREADS)


@triton.jit
def _residual_epilogue(acc, h, gate, hp, row_ok):
    """h + round(round(acc) * round(gate)), stored in h's dtype (h, gate fp32 values; hp: h's pointers)."""
    act = hp.dtype.element_ty
    tl.store(hp, (h + _rnd(_rnd(acc, act) * gate, act)).to(act), mask=row_ok[:, None])


@triton.jit
def _gated_residual(acc, h_ptr, gate, ws_ptr, cnt_ptr, rm, rn, row_ok, N: tl.constexpr, SPLIT_K: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """h[rm, rn] += round(round(acc) * gate): at once, or (SPLIT_K > 1) by the tile's last program over all partials
    (`_split_k_total`). acc [BM, BN] fp32; h [M, N] act."""
    hp = h_ptr + rm[:, None] * N + rn[None, :]
    if SPLIT_K == 1:
        _residual_epilogue(acc, tl.load(hp, mask=row_ok[:, None], other=0.0).to(tl.float32), gate, hp, row_ok)
    else:
        last, total = _split_k_total(acc, ws_ptr, cnt_ptr, rm, rn, N, SPLIT_K, BLOCK_M, BLOCK_N)
        if last:
            _residual_epilogue(total, tl.load(hp, mask=row_ok[:, None], other=0.0).to(tl.float32), gate, hp, row_ok)


@triton.jit
def gemm_residual_kernel(
    a_ptr,  # [M, K] act
    w_ptr,  # [N, K] act (nn.Linear weight)
    h_ptr,  # [M, N] act residual stream, updated in place
    gate_ptr,  # fp32 [N]: gate of this adaRMS norm
    ws_ptr,  # fp32 [SPLIT_K, grid_m * BLOCK_M, N] partial sums (SPLIT_K > 1)
    cnt_ptr,  # int32 [grid_m * grid_n] arrival counters, zero between launches
    M,
    pf_ptr,  # a later kernel's weight, prefetched into L2 (PREFETCH)
    pf_numel,
    pf_chunk,
    K: tl.constexpr,
    N: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
    USE_PDL: tl.constexpr,
    PREFETCH: tl.constexpr,
    PF_ELEM: tl.constexpr,
    PF_THREADS: tl.constexpr,
    PF_AT: tl.constexpr,  # issue the prefetch at the start (0), after the wait (1) or at the end (2)
):
    act = w_ptr.dtype.element_ty
    if USE_PDL:
        gdc_launch_dependents()
    if PREFETCH and PF_AT == 0:
        l2_prefetch(pf_ptr, pf_numel, pf_chunk, PF_ELEM, PF_THREADS)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * (K // SPLIT_K) + tl.arange(0, K // SPLIT_K)
    row_ok = rm < M
    w = tl.load(w_ptr + rn[:, None] * K + rk[None, :])  # this program's K slice of the weight tile
    gate = _rnd(tl.load(gate_ptr + rn), act)[None, :]
    if USE_PDL:
        gdc_wait()  # the previous kernel (which wrote a) is complete
    if PREFETCH and PF_AT == 1:
        l2_prefetch(pf_ptr, pf_numel, pf_chunk, PF_ELEM, PF_THREADS)
    a = tl.load(a_ptr + rm[:, None] * K + rk[None, :], mask=row_ok[:, None], other=0.0)
    hp = h_ptr + rm[:, None] * N + rn[None, :]
    h = tl.load(hp, mask=row_ok[:, None], other=0.0).to(tl.float32)  # only the tile's last program writes h
    acc = tl.dot(a, tl.trans(w), input_precision=DOT_PREC)
    if SPLIT_K == 1:
        _residual_epilogue(acc, h, gate, hp, row_ok)
    else:
        last, total = _split_k_total(acc, ws_ptr, cnt_ptr, rm, rn, N, SPLIT_K, BLOCK_M, BLOCK_N)
        if last:
            _residual_epilogue(total, h, gate, hp, row_ok)
    if PREFETCH and PF_AT == 2:
        l2_prefetch(pf_ptr, pf_numel, pf_chunk, PF_ELEM, PF_THREADS)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: exact fp32 products for fp32 operands (as torch's "highest"), else the default."""
    return "ieee" if dtype == torch.float32 else "tf32"


def pdl_options(pdl: bool) -> dict[str, bool]:
    """The USE_PDL constexpr and launch option (launch_pdl passed only when on: the interpreter has no such option)."""
    return {"USE_PDL": True, "launch_pdl": True} if pdl else {"USE_PDL": False}


def block_m(rows: int, cap: int = 64) -> int:
    """Rows per program of the GEMM kernels: the next power of two >= rows, between 16 and `cap`."""
    return max(16, min(cap, triton.next_power_of_2(rows)))


NORM_BLOCK_M = 16  # rows per program of the kernels that normalize whole rows (32 x 1024 spills registers)


def launch_norm_gemm(
    h: torch.Tensor,
    mod: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    ws: torch.Tensor,
    counters: torch.Tensor,
    *,
    horizon: int,
    eps: float,
    bn: int,
    split: int,
    warps: int,
    mod_late: bool,
    pdl: bool,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    head_dim: int = 0,
    rope_cols: int = 0,
    prefetch: torch.Tensor | None = None,
    prefetch_at: int = 0,
) -> None:
    """out = epilogue(adaRMS(h; mod) @ w.T): RoPE pairs when `cos` is given, else GeGLU pairs.

    h [M, D]; mod fp32 [3D] contiguous; w [N, D] interleaved; out [M, N / 2] (GeGLU) or [M, N] (RoPE);
    cos/sin [B, 1, horizon, head_dim]; split > 1: ws fp32 [>= split * grid_m * BLOCK_M * N], counters int32 zeros
    [>= grid_m * N / bn] (as `launch_gemm_residual`); prefetch: a tensor to pull into L2 (a later kernel's weight).
    """
    grid, args, consts = norm_gemm_args(
        h, mod, w, out, ws, counters, horizon, eps, bn, split, cos, sin, head_dim, rope_cols
    )
    norm_gemm_kernel[grid](
        *args, **prefetch_args(prefetch, w, grid[0] * grid[1] * grid[2], warps, prefetch_at), **consts,
        MOD_LATE=mod_late, num_warps=warps, **pdl_options(pdl),
    )  # fmt: skip


def norm_gemm_args(
    h: torch.Tensor, mod: torch.Tensor, w: torch.Tensor, out: torch.Tensor, ws: torch.Tensor, counters: torch.Tensor,
    horizon: int, eps: float, bn: int, split: int, cos: torch.Tensor | None, sin: torch.Tensor | None, head_dim: int,
    rope_cols: int,
) -> tuple[tuple[int, int, int], tuple, dict]:  # fmt: skip
    """Grid, runtime arguments and shared constexprs of the norm-GEMM kernels (`launch_norm_gemm` and the streaming
    variant): rows per program along M (batch > 1: more programs, each loading the weight tile, L2 hits), RoPE
    tables or placeholders."""
    m, d = h.shape
    n = w.shape[0]
    bm = block_m(m, NORM_BLOCK_M)
    rope = cos is not None
    cs, sn, stride_b, stride_l = rope_args(h, cos, sin)
    args = (h, mod, w, out, ws, counters, cs, sn, m, horizon, stride_b, stride_l, eps)
    consts = {
        "D": d, "N": n, "OUT_N": out.shape[1], "HD": head_dim if rope else 2, "ROPE_N": rope_cols, "GEGLU": not rope,
        "SPLIT_K": split, "BLOCK_M": bm, "BLOCK_N": bn, "DOT_PREC": dot_precision(w.dtype),
    }  # fmt: skip
    return (n // bn, split, triton.cdiv(m, bm)), args, consts


def rope_args(
    h: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """The norm-GEMM kernels' (cos_ptr, sin_ptr, cs_stride_b, cs_stride_l): the RoPE tables [B, 1, L, HD], or h as a
    placeholder (GeGLU kernels read no table)."""
    if cos is None or sin is None:
        return h, h, 0, 0
    return cos, sin, cos.stride(0), cos.stride(2)


def launch_gemm_residual(
    a: torch.Tensor,
    w: torch.Tensor,
    h: torch.Tensor,
    gate: torch.Tensor,
    ws: torch.Tensor,
    counters: torch.Tensor,
    *,
    bn: int,
    split: int,
    warps: int,
    pdl: bool,
    prefetch: torch.Tensor | None = None,
    prefetch_at: int = 0,
) -> None:
    """h += round(round(a @ w.T) * round(gate)). a [M, K], w [N, K], h [M, N], gate fp32 [N];
    ws fp32 [>= split * grid_m * BLOCK_M * N]; counters int32 zeros [>= grid_m * N / bn]; prefetch: as
    `launch_norm_gemm`."""
    m, k = a.shape
    n = w.shape[0]
    bm = block_m(m)
    grid = (n // bn, split, triton.cdiv(m, bm))
    gemm_residual_kernel[grid](
        a, w, h, gate, ws, counters, m, **prefetch_args(prefetch, w, grid[0] * grid[1] * grid[2], warps, prefetch_at),
        K=k, N=n, SPLIT_K=split, BLOCK_M=bm, BLOCK_N=bn,
        DOT_PREC=dot_precision(w.dtype), num_warps=warps, **pdl_options(pdl),
    )  # fmt: skip
