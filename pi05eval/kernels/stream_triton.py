"""Weight-streaming variants of the two GEMM kernels of an expert layer (same math as `expert_triton`).

`expert_triton`'s kernels load a program's whole weight tile into registers before the PDL wait; these loop over
BLOCK_K-wide chunks that Triton software-pipelines through shared memory (`STAGES` buffers, cp.async), so a program
holds a few chunks instead of its whole tile: more programs fit on an SM and the loads of one kernel overlap the
tail of the previous one. The first chunk (`PRE`) is loaded before the wait. `SWAP` puts the weight chunk on the
MMA's A side ([BLOCK_N, BLOCK_K] @ [BLOCK_K, BLOCK_M]: the ~10 activation rows become the MMA's narrow N side).

* `norm_gemm_stream_kernel`      adaRMS (the rows' mean of squares in a first pass over h) + GEMM + RoPE / GeGLU pairs;
* `gemm_residual_stream_kernel`  GEMM + gated residual.

Split-K partials are combined by the last program of a tile to arrive, in split order (deterministic), as in
`expert_triton`. Rounding follows the PyTorch path as there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from pi05eval.kernels.expert_triton import (
    _gated_residual,
    _pair_epilogue,
    _rnd,
    _rope_tables,
    _split_k_total,
    block_m,
    dot_precision,
    norm_gemm_args,
    norm_slice,
    pdl_options,
)


@triton.jit
def _chunk_dot(acc, w, x, SWAP: tl.constexpr, DOT_PREC: tl.constexpr):
    """acc += x @ w.T for w [BN, BK], x [BM, BK]; acc is [BN, BM] (SWAP) or [BM, BN]."""
    if SWAP:  # one return: Triton also type-checks the branch a constexpr rules out
        out = tl.dot(w, tl.trans(x), acc, input_precision=DOT_PREC)
    else:
        out = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PREC)
    return out


@triton.jit
def norm_gemm_stream_kernel(
    h_ptr,  # [M, D] act: residual stream
    mod_ptr,  # fp32 [3D]: (scale | shift | gate)
    w_ptr,  # [N, D] act: pair-interleaved weight
    out_ptr,  # [M, OUT_N] act
    ws_ptr,  # fp32 [SPLIT_K, grid_m * BLOCK_M, N] (SPLIT_K > 1)
    cnt_ptr,  # int32 [grid_m * grid_n], zero between launches (SPLIT_K > 1)
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
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    STAGES: tl.constexpr,
    PRE: tl.constexpr,
    SWAP: tl.constexpr,
    DOT_PREC: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    if USE_PDL:
        gdc_launch_dependents()
    n0 = tl.program_id(0) * BLOCK_N
    KS: tl.constexpr = D // SPLIT_K
    rm = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = n0 + tl.arange(0, BLOCK_N)
    rk = tl.program_id(1) * KS + tl.arange(0, BLOCK_K)
    row_ok = rm < M
    w_ptrs = w_ptr + rn[:, None] * D + rk[None, :]
    h_ptrs = h_ptr + rm[:, None] * D + rk[None, :]
    if PRE:
        w0 = tl.load(w_ptrs)  # before the wait: no kernel of the step writes weights
    cos1, sin1, cos2, sin2 = _rope_tables(
        cos_ptr, sin_ptr, rm, row_ok, n0, L, cs_stride_b, cs_stride_l, HD, BLOCK_N, GEGLU
    )
    if USE_PDL:
        gdc_wait()  # the previous kernel (which wrote h) is complete
    ss = tl.zeros([BLOCK_M], tl.float32)
    for d0 in tl.static_range(0, D, BLOCK_K):  # the whole rows' sum of squares
        hc = tl.load(h_ptr + rm[:, None] * D + (d0 + tl.arange(0, BLOCK_K))[None, :], mask=row_ok[:, None], other=0.0)
        ss += tl.sum(hc.to(tl.float32) * hc.to(tl.float32), axis=1)
    rstd = 1.0 / tl.sqrt(ss / D + eps)
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32) if SWAP else tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if PRE:
        x0 = norm_slice(tl.load(h_ptrs, mask=row_ok[:, None], other=0.0), rstd, mod_ptr, rk, D, 0.0, 0.0, True)
        acc = _chunk_dot(acc, w0, x0, SWAP, DOT_PREC)
    for k in tl.range(PRE * BLOCK_K, KS, BLOCK_K, num_stages=STAGES):
        x = norm_slice(tl.load(h_ptrs + k, mask=row_ok[:, None], other=0.0), rstd, mod_ptr, rk + k, D, 0.0, 0.0, True)
        acc = _chunk_dot(acc, tl.load(w_ptrs + k), x, SWAP, DOT_PREC)
    if SWAP:
        acc = tl.trans(acc)  # [BM, BN]
    act = w_ptr.dtype.element_ty
    if SPLIT_K == 1:
        _pair_epilogue(_rnd(acc, act), rm, row_ok, n0, out_ptr, cos1, sin1, cos2, sin2, OUT_N, HD, ROPE_N, GEGLU,
                       BLOCK_M, BLOCK_N)  # fmt: skip
    else:
        last, total = _split_k_total(acc, ws_ptr, cnt_ptr, rm, rn, N, SPLIT_K, BLOCK_M, BLOCK_N)
        if last:
            _pair_epilogue(_rnd(total, act), rm, row_ok, n0, out_ptr, cos1, sin1, cos2, sin2, OUT_N, HD, ROPE_N,
                           GEGLU, BLOCK_M, BLOCK_N)  # fmt: skip


@triton.jit
def gemm_residual_stream_kernel(
    a_ptr,  # [M, K] act
    w_ptr,  # [N, K] act
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
    STAGES: tl.constexpr,
    PRE: tl.constexpr,
    SWAP: tl.constexpr,
    DOT_PREC: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    act = w_ptr.dtype.element_ty
    if USE_PDL:
        gdc_launch_dependents()
    KS: tl.constexpr = K // SPLIT_K
    rm = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.program_id(1) * KS + tl.arange(0, BLOCK_K)
    row_ok = rm < M
    w_ptrs = w_ptr + rn[:, None] * K + rk[None, :]
    a_ptrs = a_ptr + rm[:, None] * K + rk[None, :]
    if PRE:
        w0 = tl.load(w_ptrs)
    gate = _rnd(tl.load(gate_ptr + rn), act)[None, :]
    if USE_PDL:
        gdc_wait()  # the previous kernel (which wrote a) is complete
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32) if SWAP else tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if PRE:
        acc = _chunk_dot(acc, w0, tl.load(a_ptrs, mask=row_ok[:, None], other=0.0), SWAP, DOT_PREC)
    for k in tl.range(PRE * BLOCK_K, KS, BLOCK_K, num_stages=STAGES):
        acc = _chunk_dot(acc, tl.load(w_ptrs + k), tl.load(a_ptrs + k, mask=row_ok[:, None], other=0.0), SWAP,
                         DOT_PREC)  # fmt: skip
    if SWAP:
        acc = tl.trans(acc)  # [BM, BN]
    _gated_residual(acc, h_ptr, gate, ws_ptr, cnt_ptr, rm, rn, row_ok, N, SPLIT_K, BLOCK_M, BLOCK_N)


def _chunk(k_slice: int, bk: int) -> int:
    """BLOCK_K: bk clamped to the program's K slice (the tiny test model's slices are narrow)."""
    return max(16, min(bk, k_slice))


def launch_norm_gemm_stream(
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
    bk: int,
    stages: int,
    swap: bool,
    warps: int,
    pdl: bool,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    head_dim: int = 0,
    rope_cols: int = 0,
) -> None:
    """As `launch_norm_gemm` (same arguments and result), streaming the weight in bk-wide chunks."""
    grid, args, consts = norm_gemm_args(
        h, mod, w, out, ws, counters, horizon, eps, bn, split, cos, sin, head_dim, rope_cols
    )
    norm_gemm_stream_kernel[grid](
        *args, **consts, BLOCK_K=_chunk(h.shape[1] // split, bk), STAGES=stages, PRE=1, SWAP=swap, num_warps=warps,
        **pdl_options(pdl),
    )  # fmt: skip


def launch_gemm_residual_stream(
    a: torch.Tensor,
    w: torch.Tensor,
    h: torch.Tensor,
    gate: torch.Tensor,
    ws: torch.Tensor,
    counters: torch.Tensor,
    *,
    bn: int,
    split: int,
    bk: int,
    stages: int,
    swap: bool,
    warps: int,
    pdl: bool,
) -> None:
    """As `launch_gemm_residual` (same arguments and result), streaming the weight in bk-wide chunks."""
    m, k = a.shape
    n = w.shape[0]
    bm = block_m(m)
    gemm_residual_stream_kernel[(n // bn, split, triton.cdiv(m, bm))](
        a, w, h, gate, ws, counters, m, K=k, N=n, SPLIT_K=split, BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_K=_chunk(k // split, bk), STAGES=stages, PRE=1, SWAP=swap, DOT_PREC=dot_precision(w.dtype),
        num_warps=warps, **pdl_options(pdl),
    )  # fmt: skip
