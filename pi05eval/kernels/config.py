"""Tile sizes and weight layouts of the denoise kernels (no Triton import: the config is plain data).

`ExpertKernelConfig` is what `TritonDenoise` and the sweep of `scripts/bench_triton_denoise.py` vary; `resolve` clamps
it to a model's dimensions; `interleave_*` re-lay fused weights so one kernel tile holds both halves of a RoPE pair or
a gate / up pair.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertKernelConfig:
    """Tile sizes of the kernels of one denoise step (clamped to the model's dimensions by `resolve`).

    *_bn: output columns per program (pair-interleaved kernels: weight rows, i.e. bn / 2 output pairs), each program
    holding bn x K / *_split of the weight (*_split programs share an output tile: split-K). stream: the GEMMs as
    `stream_triton`'s kernels, which loop over *_bk-wide chunks of K pipelined through `stages` shared-memory buffers
    (swap: the weight on the MMA's A side) instead of holding the whole tile in registers. att_bs: keys per
    attention program (key blocks, combined by the last program); att_bm: query rows per program; att_dsplit:
    programs sharing a row block and key block, each producing hd / att_dsplit output columns. mod_late: load the
    adaRMS scale / shift after the wait (fewer live registers) instead of with the weights. pdl: programmatic
    dependent launch (Hopper+). prefetch: every GEMM kernel pulls into L2 the weight of the GEMM `prefetch` GEMMs
    later (0: off; Hopper+, not with stream); att_prefetch: the attention kernel pulls in the weight of the GEMM
    `att_prefetch` GEMMs after it (1: O, 2: gate|up); prefetch_at: where in the kernel (0 start, 1 after the wait,
    2 end). tma: the GEMMs as `tma_triton`'s kernels, which copy a program's weight tile into shared memory (one TMA
    box of *_bk-wide chunks) before the wait; the norm kernels then need qkv_split = gu_split = 1 (Hopper+).
    atomic_residual: the O and down projections add their split-K partials into an fp32 buffer by atomic adds and the
    next norm kernel applies the gated residual (`atomic_triton`; needs qkv_split = gu_split = 1, not with stream,
    tma or prefetch; exact up to fp32 summation order, not bitwise repeatable). cuda_chain: per layer, O, gate|up, down
    and the next layer's Q/K/V as one persistent CUDA launch (`chain_cuda`; Hopper, bf16, batch x horizon <= 16;
    not with stream, tma, atomic_residual or prefetch), with chain_splits the K splits of those four GEMMs over its
    warps.
    Defaults: the best of a coordinate-descent sweep on an H200 (scripts/bench_triton_denoise.py).
    """

    qkv_bn: int = 64
    qkv_split: int = 1
    qkv_warps: int = 8
    att_bs: int = 64
    att_bm: int = 16
    att_dsplit: int = 2
    att_warps: int = 8
    o_bn: int = 64
    o_split: int = 4
    o_warps: int = 4
    gu_bn: int = 64
    gu_split: int = 1
    gu_warps: int = 8
    down_bn: int = 64
    down_split: int = 4
    down_warps: int = 8
    io_bn: int = 64
    mod_late: bool = False
    pdl: bool = True
    stream: bool = False
    qkv_bk: int = 256
    o_bk: int = 256
    gu_bk: int = 256
    down_bk: int = 256
    stages: int = 3
    swap: bool = True
    prefetch: int = 0
    att_prefetch: int = 0
    prefetch_at: int = 0
    tma: bool = False
    atomic_residual: bool = False
    cuda_chain: bool = False
    chain_splits: tuple[int, int, int, int] = (8, 8, 4, 8)


def _pow2_at_most(value: int, limit: int) -> int:
    """The largest power of two <= min(value, limit), at least 16 (tl.dot's smallest tile side)."""
    cap = max(16, min(value, limit))
    return 1 << (cap.bit_length() - 1)


def _is_pow2(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def resolve(cfg: ExpertKernelConfig, width: int, mlp: int, q_width: int, head_dim: int) -> ExpertKernelConfig:
    """Clamp tiles to the model (the tiny test model has width 64, head_dim 16) and check they tile it."""
    out = dataclasses.replace(
        cfg,
        qkv_bn=_pow2_at_most(cfg.qkv_bn, head_dim),
        att_bs=_pow2_at_most(cfg.att_bs, 1 << 12),
        att_dsplit=max(1, min(cfg.att_dsplit, head_dim // 16)),
        o_bn=_pow2_at_most(cfg.o_bn, width),
        qkv_split=max(1, min(cfg.qkv_split, width // 16)),
        gu_split=max(1, min(cfg.gu_split, width // 16)),
        o_split=max(1, min(cfg.o_split, q_width // 16)),
        gu_bn=_pow2_at_most(cfg.gu_bn, 2 * mlp),
        down_bn=_pow2_at_most(cfg.down_bn, width),
        down_split=max(1, min(cfg.down_split, mlp // 16)),
        io_bn=_pow2_at_most(cfg.io_bn, width),
        chain_splits=tuple(cfg.chain_splits),  # a list from JSON (sweeps) -> hashable
    )
    dims = {"width": width, "mlp": mlp, "q_width": q_width, "head_dim": head_dim}
    bad = [f"{k}={v} is not a power of 2 >= 16" for k, v in dims.items() if not _is_pow2(v)]
    splits = ("qkv_split", "gu_split", "o_split", "down_split", "att_dsplit")
    bad += [f"{k}={getattr(out, k)} is not a power of 2" for k in splits if getattr(out, k) & (getattr(out, k) - 1)]
    if bad:
        raise ValueError(f"kernel config {out} does not tile this model: {bad}")
    return out


def interleave_halves(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[n_heads * hd, D] -> the same rows with, per head, row 2i = row i and row 2i + 1 = row i + hd/2 (RoPE pairs)."""
    n, d = w.shape
    return w.view(n // head_dim, 2, head_dim // 2, d).transpose(1, 2).reshape(n, d).contiguous()


def interleave_gate_up(w: torch.Tensor) -> torch.Tensor:
    """[2 * mlp, D] (gate rows, then up rows) -> rows 2j = gate j, 2j + 1 = up j."""
    n, d = w.shape
    return w.view(2, n // 2, d).transpose(0, 1).reshape(n, d).contiguous()
