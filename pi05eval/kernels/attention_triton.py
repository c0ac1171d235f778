"""Triton attention of the action tokens over [prefix K/V | action K/V] in one launch (split keys, last one combines).

The G = H / KV query heads of one K/V head read the same keys, so their G * L rows (80 for Pi0.5) form one row
set. Each program takes one block of BLOCK_S keys (flash-decoding split), a block of rows and, optionally, a slice
of the output's head dimension (`DSPLIT`; the logits are then computed by each of those programs). It loads its
prefix K/V block and key mask before waiting for the previous kernel (programmatic dependent launch), then computes
for its rows the max m, the sum l of exp(logit - m) and the unnormalized output; the last program of a (row block,
output slice) to arrive (atomic counter, reset by it) combines the key blocks in order (deterministic) and writes
the normalized output.

Numerics follow `pi05eval.model.attention.attention`: logits = round(round(q . k) * scale) in the activation dtype,
masked keys get the finite MASK_VALUE, softmax in fp32, probabilities rounded to the activation dtype before PV.
Differences: probabilities are rounded before normalization (flash style), and exp/div use the GPU's fast fp32 forms.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from pi05eval.kernels.expert_triton import dot_precision, pdl_options
from pi05eval.kernels.prefetch import l2_prefetch, prefetch_args

MASK_VALUE = tl.constexpr(-2.3819763e38)  # pi05eval.model.attention.MASK_VALUE


@triton.jit
def combine_partial(m_run, den, num, m_c, l_c, a_c):
    """One step of the online softmax combine: the running (max, sum of exp, unnormalized output) of the rows with one
    more partial (m_c, l_c, a_c) of theirs -> the updated three. m_run may be -inf (nothing yet); m_c must be finite."""
    m_new = tl.maximum(m_run, m_c)
    alpha = tl.exp(m_run - m_new)
    beta = tl.exp(m_c - m_new)
    return m_new, den * alpha + beta * l_c, num * alpha[:, None] + beta[:, None] * a_c


@triton.jit
def attention_kernel(
    qkv_ptr,  # [B * L, QKV_N] act: q | k | v of the action tokens, RoPE applied
    kc_ptr,  # prefix keys of this layer, [B, KV, P_alloc, HD] act (last dim contiguous)
    vc_ptr,  # prefix values, same layout
    mask_ptr,  # [B, S] uint8 (row stride mask_stride_b): 1 = may attend; S = P + L
    out_ptr,  # [B * L, H * HD] act
    pm_ptr,  # fp32 [NS, BKV * DSPLIT, R_PAD]: per key block max
    pl_ptr,  # fp32 [NS, BKV * DSPLIT, R_PAD]: per key block sum of exp
    pacc_ptr,  # fp32 [NS, BKV, R_PAD, HD]: per key block unnormalized output
    cnt_ptr,  # int32 [BKV * DSPLIT * n_row_blocks] arrival counters, zero between launches
    P,
    c_stride_b,
    c_stride_h,
    c_stride_p,
    mask_stride_b,
    scale,
    pf_ptr,  # a later kernel's weight, prefetched into L2 (PREFETCH)
    pf_numel,
    pf_chunk,
    L: tl.constexpr,
    H: tl.constexpr,
    KV: tl.constexpr,
    HD: tl.constexpr,
    QKV_N: tl.constexpr,
    NS: tl.constexpr,
    DSPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_S: tl.constexpr,
    DOT_PREC: tl.constexpr,  # "ieee" for fp32 operands (no TF32); ignored for 16-bit ones
    USE_PDL: tl.constexpr,
    PREFETCH: tl.constexpr,
    PF_ELEM: tl.constexpr,
    PF_THREADS: tl.constexpr,
    PF_AT: tl.constexpr,  # issue the prefetch at the start (0), after the wait (1) or at the end (2)
):
    act = qkv_ptr.dtype.element_ty
    if USE_PDL:
        gdc_launch_dependents()
    if PREFETCH and PF_AT == 0:
        l2_prefetch(pf_ptr, pf_numel, pf_chunk, PF_ELEM, PF_THREADS)
    G: tl.constexpr = H // KV
    DS: tl.constexpr = HD // DSPLIT
    pid_s = tl.program_id(0)  # key block
    pid_r = tl.program_id(1)  # row block
    pid_z = tl.program_id(2)  # (batch, kv head, output slice)
    bkv = pid_z // DSPLIT
    ds = pid_z % DSPLIT
    b = bkv // KV
    kvh = bkv % KV
    r_pad = tl.num_programs(1) * BLOCK_M
    s_len = P + L
    r = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)  # rows of this K/V head: (head in group, token)
    r_ok = r < G * L
    hq = kvh * G + r // L
    qrow = b * L + r % L
    d = tl.arange(0, HD)
    dv = ds * DS + tl.arange(0, DS)
    j = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    in_p = j < P
    in_a = (j >= P) & (j < s_len)
    # inputs no kernel of the step writes: the prefix K/V block and the key mask
    c_off = b * c_stride_b + kvh * c_stride_h + j[:, None] * c_stride_p
    kp = tl.load(kc_ptr + c_off + d[None, :], mask=in_p[:, None], other=0.0)
    vp = tl.load(vc_ptr + c_off + dv[None, :], mask=in_p[:, None], other=0.0)
    allowed = tl.load(mask_ptr + b * mask_stride_b + j, mask=j < s_len, other=0) != 0
    if USE_PDL:
        gdc_wait()  # the previous kernel (which wrote qkv) is complete
    if PREFETCH and PF_AT == 1:
        l2_prefetch(pf_ptr, pf_numel, pf_chunk, PF_ELEM, PF_THREADS)
    q = tl.load(qkv_ptr + qrow[:, None] * QKV_N + hq[:, None] * HD + d[None, :], mask=r_ok[:, None], other=0.0)
    arow = (b * L + j - P)[:, None] * QKV_N + kvh * HD
    ka = tl.load(qkv_ptr + arow + H * HD + d[None, :], mask=in_a[:, None], other=0.0)
    va = tl.load(qkv_ptr + arow + (H + KV) * HD + dv[None, :], mask=in_a[:, None], other=0.0)
    k = tl.where(in_p[:, None], kp, ka)
    v = tl.where(in_p[:, None], vp, va)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # [BLOCK_M, BLOCK_S] fp32
    s = (s.to(act).to(tl.float32) * scale).to(act).to(tl.float32)  # logits in act, scaled after QK^T
    s = tl.where(allowed[None, :], s, MASK_VALUE)
    s = tl.where((j < s_len)[None, :], s, float("-inf"))  # past the end: no weight at all
    m_i = tl.max(s, axis=1)  # finite: every key block starts before s_len
    p = tl.exp(s - m_i[:, None])
    l_i = tl.sum(p, axis=1)
    acc = tl.dot(p.to(act), v, input_precision=DOT_PREC)  # [BLOCK_M, DS]
    # partials of this key block, then the last program of (row block, batch, kv head, slice) combines
    stat = (pid_s * tl.num_programs(2) + pid_z) * r_pad + r
    tl.store(pm_ptr + stat, m_i)
    tl.store(pl_ptr + stat, l_i)
    part = pacc_ptr + (bkv * r_pad + r)[:, None] * HD + dv[None, :]
    chunk_stride = tl.num_programs(2) // DSPLIT * r_pad * HD
    tl.store(part + pid_s * chunk_stride, acc)
    tl.debug_barrier()  # every thread's partial is written before the (release) arrival
    tile = pid_z * tl.num_programs(1) + pid_r
    arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
    if arrived == NS - 1:
        stat_stride = tl.num_programs(2) * r_pad
        own = pid_z * r_pad + r
        m_run = tl.full([BLOCK_M], float("-inf"), tl.float32)
        den = tl.zeros([BLOCK_M], tl.float32)
        num = tl.zeros([BLOCK_M, DS], tl.float32)
        for c in tl.static_range(NS):  # online combine in key block order: deterministic
            m_c = tl.load(pm_ptr + c * stat_stride + own, cache_modifier=".cg")
            l_c = tl.load(pl_ptr + c * stat_stride + own, cache_modifier=".cg")
            a_c = tl.load(part + c * chunk_stride, cache_modifier=".cg")
            m_run, den, num = combine_partial(m_run, den, num, m_c, l_c, a_c)
        o = num / den[:, None]
        optr = out_ptr + qrow[:, None] * (H * HD) + hq[:, None] * HD + dv[None, :]
        tl.store(optr, o.to(act), mask=r_ok[:, None])
        tl.store(cnt_ptr + tile, 0)
    if PREFETCH and PF_AT == 2:
        l2_prefetch(pf_ptr, pf_numel, pf_chunk, PF_ELEM, PF_THREADS)


class AttentionScratch:
    """Partials and counters of `launch_attention` for one (batch, prefix length) shape."""

    def __init__(
        self, batch: int, prefix_len: int, horizon: int, heads: int, kv_heads: int, head_dim: int,
        bm: int, bs: int, dsplit: int, device: torch.device,
    ) -> None:  # fmt: skip
        self.n_blocks = triton.cdiv(prefix_len + horizon, bs)
        self.n_row_blocks = triton.cdiv(heads // kv_heads * horizon, bm)
        r_pad = self.n_row_blocks * bm
        bkv = batch * kv_heads
        f32 = torch.float32
        self.pm = torch.empty(self.n_blocks, bkv * dsplit, r_pad, dtype=f32, device=device)
        self.pl = torch.empty_like(self.pm)
        self.pacc = torch.empty(self.n_blocks, bkv, r_pad, head_dim, dtype=f32, device=device)
        self.counters = torch.zeros(bkv * dsplit * self.n_row_blocks, dtype=torch.int32, device=device)


def launch_attention(
    qkv: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key_mask: torch.Tensor,
    out: torch.Tensor,
    scratch: AttentionScratch,
    *,
    prefix_len: int,
    horizon: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    scale: float,
    bm: int,
    bs: int,
    dsplit: int,
    warps: int,
    pdl: bool,
    prefetch: torch.Tensor | None = None,
    prefetch_at: int = 0,
) -> None:
    """out [B*L, H*hd] = attention of q (in qkv [B*L, (H + 2 KV) hd]) over [k_cache[:, :, :P] | k] with key_mask.

    k_cache/v_cache [B, KV, >= P, hd] (one layer's prefix cache); key_mask uint8 or bool [B, 1, P + L];
    prefetch: a tensor to pull into L2 (a later kernel's weight).
    """
    batch = k_cache.shape[0]
    mask = key_mask.view(torch.uint8) if key_mask.dtype == torch.bool else key_mask
    grid = (scratch.n_blocks, scratch.n_row_blocks, batch * kv_heads * dsplit)
    attention_kernel[grid](
        qkv, k_cache, v_cache, mask, out, scratch.pm, scratch.pl, scratch.pacc, scratch.counters,
        prefix_len, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), mask.stride(0), scale,
        **prefetch_args(prefetch, qkv, grid[0] * grid[1] * grid[2], warps, prefetch_at),
        L=horizon, H=heads, KV=kv_heads, HD=head_dim, QKV_N=qkv.shape[1], NS=scratch.n_blocks, DSPLIT=dsplit,
        BLOCK_M=bm, BLOCK_S=bs, DOT_PREC=dot_precision(qkv.dtype), num_warps=warps, **pdl_options(pdl),
    )  # fmt: skip
