"""Triton masked softmax of the prefix attention's logits (between inductor's two attention GEMMs).

The prefix attention runs as matmul -> softmax -> matmul (`pi05eval.model.attention.attention`); the GEMMs are
cuBLAS's, and the softmax in between is one pass over [rows, S] logits. Inductor's version recomputes exp for the
normalization and builds the pad x pad mask per element; this kernel evaluates exp once per element (the GPU's fast
exp2 form), reads the mask as two row / column vectors, and covers a row of 544 as 512 + 32 columns instead of one
padded block of 1024.

Numerics follow `attention`: logits = round(round(q . k) * scale) in the activation dtype (the input is q . k,
already rounded by its GEMM), masked (query, key) pairs get the finite MASK_VALUE (a fully masked row becomes a
uniform average, as the reference), softmax in fp32, probabilities rounded to the activation dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MASK_VALUE = tl.constexpr(-2.3819763e38)  # pi05eval.model.attention.MASK_VALUE
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _logits(x_ptr, pad_ptr, rows, row_ok, q_ok, b, x_stride, pad_stride_b, S, scale, start, BLOCK: tl.constexpr):
    """Columns [start, start + BLOCK) of the rows: scaled logits in act (as fp32), masked; -inf past S."""
    act = x_ptr.dtype.element_ty
    cols = start + tl.arange(0, BLOCK)
    col_ok = cols < S
    both = row_ok[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + rows[:, None] * x_stride + cols[None, :], mask=both, other=0.0)
    x = (x.to(tl.float32) * scale).to(act).to(tl.float32)  # logits in act, scaled after QK^T
    k_ok = tl.load(pad_ptr + b[:, None] * pad_stride_b + cols[None, :], mask=both, other=0) != 0
    x = tl.where(q_ok[:, None] & k_ok, x, MASK_VALUE)
    return tl.where(col_ok[None, :], x, float("-inf")), cols, both  # past the end: no weight at all


@triton.jit
def masked_softmax_kernel(
    x_ptr,  # [R, S] act: q . k^T; row r is (batch r // ROWS_PER_B, query token r % P)
    pad_ptr,  # [B, S] uint8: 1 = valid token (query and key index the same prefix, S = P)
    out_ptr,  # [R, S] act
    R,
    S,
    x_stride,
    out_stride,
    pad_stride_b,
    scale,
    ROWS_PER_B: tl.constexpr,  # rows per batch element: K/V heads x query heads per K/V head x P
    P: tl.constexpr,
    BLOCK_R: tl.constexpr,
    MAIN: tl.constexpr,  # the largest power of two <= S: columns [0, MAIN)
    TAIL: tl.constexpr,  # the next power of two >= S - MAIN: columns [MAIN, MAIN + TAIL); 0: none
):
    act = x_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    b = rows // ROWS_PER_B
    q_ok = tl.load(pad_ptr + b * pad_stride_b + rows % P, mask=row_ok, other=0) != 0
    x, cols, both = _logits(x_ptr, pad_ptr, rows, row_ok, q_ok, b, x_stride, pad_stride_b, S, scale, 0, MAIN)
    m = tl.max(x, axis=1)
    if TAIL > 0:
        xt, cols_t, both_t = _logits(
            x_ptr, pad_ptr, rows, row_ok, q_ok, b, x_stride, pad_stride_b, S, scale, MAIN, TAIL
        )
        m = tl.maximum(m, tl.max(xt, axis=1))
    e = tl.math.exp2((x - m[:, None]) * LOG2E)
    total = tl.sum(e, axis=1)
    if TAIL > 0:
        et = tl.math.exp2((xt - m[:, None]) * LOG2E)
        total += tl.sum(et, axis=1)
        tl.store(out_ptr + rows[:, None] * out_stride + cols_t[None, :], (et / total[:, None]).to(act), mask=both_t)
    tl.store(out_ptr + rows[:, None] * out_stride + cols[None, :], (e / total[:, None]).to(act), mask=both)


def masked_softmax(
    logits: torch.Tensor, pad: torch.Tensor, scale: float, *, block_r: int = 4, warps: int = 4
) -> torch.Tensor:
    """softmax(where(pad_q & pad_k, round(logits * scale), MASK_VALUE)) in fp32 -> logits' dtype, same shape.

    logits [B, ..., G * P, P] (last dim contiguous; rows are (batch, heads, query token)); pad [B, P] bool / uint8.
    """
    b, p = pad.shape
    if logits.shape[0] != b or logits.shape[-1] != p or logits.shape[-2] % p or logits.stride(-1) != 1:
        raise ValueError(f"logits {tuple(logits.shape)} must be [B, ..., G * P, P] (unit last stride) for pad {(b, p)}")
    x = logits.reshape(-1, p)  # a view for contiguous leading dims
    rows = x.shape[0]
    out = torch.empty(rows, p, dtype=logits.dtype, device=logits.device)
    mask = pad.to(torch.uint8)  # no copy for a uint8 pad
    main = 1 << (p.bit_length() - 1)  # the largest power of two <= P
    tail = triton.next_power_of_2(p - main) if p > main else 0
    masked_softmax_kernel[(triton.cdiv(rows, block_r),)](
        x, mask, out, rows, p, x.stride(0), out.stride(0), mask.stride(0), scale,
        ROWS_PER_B=rows // b, P=p, BLOCK_R=block_r, MAIN=main, TAIL=tail, num_warps=warps,
    )  # fmt: skip
    return out.view(logits.shape)


def attention_masked_softmax(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad: torch.Tensor, scale: float):
    """`pi05eval.model.attention.attention` of the prefix with its softmax as `masked_softmax`.

    q [B, H, P, hd]; k, v [B, KV, P, hd]; pad [B, P] (the mask is pad x pad). Returns [B, P, H * hd].
    """
    b, h, n, hd = q.shape
    kv = k.shape[1]
    qg = q.reshape(b, kv, h // kv * n, hd)  # [B, KV, G*P, hd]: the G query heads of a K/V head as rows
    probs = masked_softmax(torch.matmul(qg, k.transpose(-1, -2)), pad, scale)  # [B, KV, G*P, P]
    out = torch.matmul(probs, v)  # [B, KV, G*P, hd]
    return out.view(b, h, n, hd).transpose(1, 2).reshape(b, n, h * hd)
