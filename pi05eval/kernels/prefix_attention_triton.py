"""Triton attention of the prefix tokens over themselves (flash style), with RoPE on the queries applied on load.

The prefix is bidirectional: a valid token attends every valid key. Padding tokens of the prompt bucket are masked as
keys only; their own rows attend the valid keys (the reference gives them a uniform average over all keys). Nothing a
valid token computes reads a padding row except as a masked key, whose probability is exactly 0, so the actions are
unchanged, and every row stays finite.

One program takes BLOCK_M tokens of one query head and loops over the keys in blocks of BLOCK_N (online softmax in
fp32). With `ROPE` it reads q before rotation (e.g. a view of the fused Q/K/V GEMM's output) and rotates each head
in registers (split-half form, as `pi05eval.model.attention.apply_rope`, with the same bf16
roundings), so q is never written back rotated. The output is written as [B, P, H * hd], the O projection's input.

Numerics follow `pi05eval.model.attention.attention`: logits = round(round(q . k) * scale) in the activation dtype,
masked keys get the finite MASK_VALUE, softmax in fp32, probabilities rounded to the activation dtype before PV.
Difference: probabilities are rounded before normalization (flash style).

Measured on an H200 (Pi0.5's 544-token prefix, `scripts/bench_prefix_ops.py --triton`): 28.1 µs per layer at best,
against 23.5 µs for inductor's RoPE + matmul-softmax-matmul, and slower still with split keys; so the engine's
`Shortcuts.triton_prefix` is off by default.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pi05eval.kernels.attention_triton import combine_partial
from pi05eval.kernels.expert_triton import dot_precision

MASK_VALUE = tl.constexpr(-2.3819763e38)  # pi05eval.model.attention.MASK_VALUE


@triton.jit
def prefix_attention_kernel(
    q_ptr,  # [B, P, H * HD] act (row stride q_stride_p): queries, rotated unless ROPE
    k_ptr,  # [B, KV, >= P, HD] act, RoPE applied (last dim contiguous)
    v_ptr,  # [B, KV, >= P, HD] act
    pad_ptr,  # [B, P] uint8: 1 = valid token
    out_ptr,  # [B, P, H * HD] act, contiguous
    pm_ptr,  # fp32 [SPLIT, B, H, R_PAD]: per key split max (SPLIT > 1)
    pl_ptr,  # fp32 [SPLIT, B, H, R_PAD]: per key split sum of exp
    pacc_ptr,  # fp32 [SPLIT, B, H, R_PAD, HD]: per key split unnormalized output
    cnt_ptr,  # int32 [B, H, cdiv(P, BLOCK_M)] arrival counters, zero between launches
    cos_ptr,  # [B, P, HD] act when ROPE (contiguous)
    sin_ptr,
    P,
    q_stride_b,
    q_stride_p,
    kv_stride_b,
    kv_stride_h,
    kv_stride_p,
    pad_stride_b,
    scale,
    H: tl.constexpr,
    KV: tl.constexpr,
    HD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    N_BLOCKS: tl.constexpr,  # cdiv(P, BLOCK_N)
    SPLIT: tl.constexpr,  # programs sharing a row block, each over PER consecutive key blocks
    PER: tl.constexpr,  # cdiv(N_BLOCKS, SPLIT)
    ROPE: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    act = q_ptr.dtype.element_ty
    HALF: tl.constexpr = HD // 2
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    b = tl.program_id(2) // SPLIT
    split = tl.program_id(2) % SPLIT
    kvh = head // (H // KV)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < P
    d = tl.arange(0, HD)
    q_row = q_ptr + b * q_stride_b + rows[:, None] * q_stride_p + head * HD
    q = tl.load(q_row + d[None, :], mask=row_ok[:, None], other=0.0)  # [BLOCK_M, HD]
    if ROPE:  # q * cos + [-q2, q1] * sin, each product and the sum rounded to act (as eager)
        partner = tl.where(d < HALF, d + HALF, d - HALF)
        sign = tl.where(d < HALF, -1.0, 1.0).to(act)
        rot = tl.load(q_row + partner[None, :], mask=row_ok[:, None], other=0.0) * sign[None, :]
        cs_off = (b * P + rows)[:, None] * HD + d[None, :]
        cs = tl.load(cos_ptr + cs_off, mask=row_ok[:, None], other=0.0)
        sn = tl.load(sin_ptr + cs_off, mask=row_ok[:, None], other=0.0)
        q = ((q * cs).to(act) + (rot * sn).to(act)).to(act)
    kv_base = b * kv_stride_b + kvh * kv_stride_h
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HD], tl.float32)
    for i in range(PER):  # key blocks past N_BLOCKS (last split) are all out of range: no weight
        j = (split * PER + i) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_p = j < P
        k_off = kv_base + j[:, None] * kv_stride_p
        k = tl.load(k_ptr + k_off + d[None, :], mask=in_p[:, None], other=0.0)  # [BLOCK_N, HD]
        v = tl.load(v_ptr + k_off + d[None, :], mask=in_p[:, None], other=0.0)
        valid = tl.load(pad_ptr + b * pad_stride_b + j, mask=in_p, other=0) != 0
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # [BLOCK_M, BLOCK_N] fp32
        s = (s.to(act).to(tl.float32) * scale).to(act).to(tl.float32)  # logits in act, scaled after QK^T
        s = tl.where(valid[None, :], s, MASK_VALUE)
        s = tl.where(in_p[None, :], s, float("-inf"))  # past the end: no weight at all
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every split's first block starts before P
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(act), v, acc=acc, input_precision=DOT_PREC)
        m_i = m_new
    o_off = (b * P + rows)[:, None] * (H * HD) + head * HD + d[None, :]
    if SPLIT == 1:
        tl.store(out_ptr + o_off, (acc / l_i[:, None]).to(act), mask=row_ok[:, None])
    else:  # partials of this split; the last program of the row block to arrive combines them in split order
        r_pad = tl.num_programs(0) * BLOCK_M
        tile = b * H + head
        split_stride = tl.num_programs(2) // SPLIT * H * r_pad
        stat = tile * r_pad + rows
        tl.store(pm_ptr + split * split_stride + stat, m_i)
        tl.store(pl_ptr + split * split_stride + stat, l_i)
        part = pacc_ptr + stat[:, None] * HD + d[None, :]
        tl.store(part + split * split_stride * HD, acc)
        tl.debug_barrier()  # every thread's partial is written before the (release) arrival
        cnt = cnt_ptr + tile * tl.num_programs(0) + pid_m
        if tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu") == SPLIT - 1:
            m_run = tl.full([BLOCK_M], float("-inf"), tl.float32)
            den = tl.zeros([BLOCK_M], tl.float32)
            num = tl.zeros([BLOCK_M, HD], tl.float32)
            for sp in tl.static_range(SPLIT):  # split 0 holds key 0: m_run is finite from the first step
                m_c = tl.load(pm_ptr + sp * split_stride + stat, cache_modifier=".cg")
                l_c = tl.load(pl_ptr + sp * split_stride + stat, cache_modifier=".cg")
                a_c = tl.load(part + sp * split_stride * HD, cache_modifier=".cg")
                m_run, den, num = combine_partial(m_run, den, num, m_c, l_c, a_c)
            tl.store(out_ptr + o_off, (num / den[:, None]).to(act), mask=row_ok[:, None])
            tl.store(cnt, 0)


TILES = {"block_m": 64, "block_n": 32, "warps": 4, "stages": 3, "split": 1}  # the engine's: the best of the sweep


class PrefixAttentionScratch:
    """Partials and arrival counters of `prefix_attention` with up to `split` key splits, for one (batch, prefix
    length) shape; the counters are reset by every launch, so the layers of a prefill can share one."""

    def __init__(
        self, batch: int, prefix_len: int, heads: int, head_dim: int, block_m: int, split: int, device: torch.device
    ) -> None:
        row_blocks = triton.cdiv(prefix_len, block_m)
        r_pad = row_blocks * block_m
        self.pm = torch.empty(split, batch, heads, r_pad, dtype=torch.float32, device=device)
        self.pl = torch.empty_like(self.pm)
        self.pacc = torch.empty(split, batch, heads, r_pad, head_dim, dtype=torch.float32, device=device)
        self.counters = torch.zeros(batch, heads, row_blocks, dtype=torch.int32, device=device)


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pad: torch.Tensor,
    scale: float,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    *,
    block_m: int = 64,
    block_n: int = 64,
    warps: int = 4,
    stages: int = 3,
    split: int = 1,
    scratch: PrefixAttentionScratch | None = None,
) -> torch.Tensor:
    """Bidirectional attention of the prefix -> [B, P, H * hd] (see the module docstring).

    q [B, P, H * hd] (last dim contiguous; rotated, or not when cos / sin [B, P, hd] are given); k, v [B, KV, >= P, hd]
    (the first P positions are read; last dim contiguous); pad [B, P] bool or uint8, True = valid token.
    split: programs per row block, each over a run of key blocks (clamped so none is empty); scratch: their partials
    (allocated here when not given; pass one to share it between layers).
    """
    b, p, qw = q.shape
    kv, hd = k.shape[1], k.shape[3]
    heads = qw // hd
    if q.stride(2) != 1 or k.stride(3) != 1 or v.stride(3) != 1 or k.stride() != v.stride():
        raise ValueError("prefix_attention needs unit-stride head dims and k, v of one layout")
    if hd < 16 or hd & (hd - 1) or heads % kv:
        raise ValueError(f"head_dim {hd} must be a power of 2 >= 16 and heads {heads} a multiple of kv heads {kv}")
    rope = cos is not None
    if rope:
        cos, sin = cos.reshape(b, p, hd).contiguous(), sin.reshape(b, p, hd).contiguous()
    mask = pad.to(torch.uint8)  # no copy for a uint8 pad
    out = torch.empty(b, p, qw, dtype=q.dtype, device=q.device)
    n_blocks = triton.cdiv(p, block_n)
    split = min(split, n_blocks)
    per = triton.cdiv(n_blocks, split)
    split = triton.cdiv(n_blocks, per)  # every split starts inside the keys
    if split > 1 and scratch is None:
        scratch = PrefixAttentionScratch(b, p, heads, hd, block_m, split, q.device)
    parts = (scratch.pm, scratch.pl, scratch.pacc, scratch.counters) if split > 1 else (out,) * 4
    grid = (triton.cdiv(p, block_m), heads, b * split)
    prefix_attention_kernel[grid](
        q, k, v, mask, out, *parts, cos if rope else q, sin if rope else q,
        p, q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), mask.stride(0), scale,
        H=heads, KV=kv, HD=hd, BLOCK_M=block_m, BLOCK_N=block_n,
        N_BLOCKS=n_blocks, SPLIT=split, PER=per, ROPE=rope, DOT_PREC=dot_precision(q.dtype),
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out
