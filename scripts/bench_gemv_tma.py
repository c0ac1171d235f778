"""Micro-benchmark: the expert's small-M GEMMs with the whole weight tile copied by TMA into shared memory.

    PYTHONPATH=$PWD python scripts/bench_gemv_tma.py --out tma.json

A bare GEMM (no epilogue, fp32 partials stored) whose program copies its weight tile, re-laid as
`pi05eval.kernels.tma_triton.TmaWeight` (the K chunks stacked as rows, one box), into shared memory before the PDL
wait; wgmma reads it there. Per shape over (bn, bk, split, warps), each timed as 18 launches with distinct weights in
one CUDA graph (as `bench_gemv.py`), checked against torch; then the four-GEMM layer chain at the best tilings
against today's kernels (`bench_gemv.reg_launchers`). The kernels with epilogues are `tma_triton`'s
(`ExpertKernelConfig.tma`, timed by `bench_triton_denoise.py`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl
from bench_gemv import DEPTH, ROWS, SHAPES, Buffers, dump, per_launch_us, reg_launchers, time_graph
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from pi05eval.bench import environment
from pi05eval.kernels.expert_triton import pdl_options
from pi05eval.kernels.tma_triton import TmaWeight, _diagonal_sum


@triton.jit
def tma_gemm_kernel(
    w_desc,  # TMA descriptor of the re-laid weight [N / BN * SPLIT * NCH * BN, BK] act (`TmaWeight`)
    x_ptr,  # [M, K] act
    ws_ptr,  # fp32 [SPLIT, BM, N]
    M,
    K: tl.constexpr,
    N: tl.constexpr,
    SPLIT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """A program's whole weight tile [BN, K / SPLIT] (NCH chunks of BK, stacked as rows) copied by one TMA load into
    shared memory before the PDL wait; after it, one MMA of the stacked chunks with the activation chunks side by
    side ([NCH * BN, BK] @ [BK, NCH * BM]) whose diagonal blocks summed are the product; fp32 partials stored."""
    if USE_PDL:
        gdc_launch_dependents()
    KS: tl.constexpr = K // SPLIT
    NCH: tl.constexpr = KS // BK
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    t = w_desc.load([(pid_n * SPLIT + pid_k) * NCH * BN, 0])  # [NCH * BN, BK]
    if USE_PDL:
        gdc_wait()
    j = tl.arange(0, NCH * BM)
    m = j % BM
    kk = pid_k * KS + (j // BM) * BK
    xs = tl.load(x_ptr + m[None, :] * K + kk[None, :] + tl.arange(0, BK)[:, None], mask=(m < M)[None, :], other=0.0)
    p = tl.dot(t, xs)  # [NCH * BN, NCH * BM]: block (c, c') = chunk c of the weight times chunk c' of x
    acc = tl.trans(_diagonal_sum(p, NCH, BN, BM))  # [BN, BM]
    rn = pid_n * BN + tl.arange(0, BN)
    tl.store(ws_ptr + pid_k * BM * N + tl.arange(0, BM)[None, :] * N + rn[:, None], acc)


_TILES: dict[tuple[int, int, int, int], TmaWeight] = {}


def launch_tma(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, c: dict[str, Any], pdl: bool = True) -> Any:
    """One launch of `tma_gemm_kernel` with tiling c (bn, bk, split, warps); the re-laid weight is kept per tiling."""
    n, k = w.shape
    key = (w.data_ptr(), c["bn"], c["bk"], c["split"])
    if key not in _TILES:
        _TILES[key] = TmaWeight(w, c["bn"], c["split"], c["bk"])
    t = _TILES[key]
    return tma_gemm_kernel[(n // t.bn, t.split)](
        t.desc, x, ws, x.shape[0], K=k, N=n, SPLIT=t.split, BM=16, BN=t.bn, BK=t.bk,
        num_warps=c["warps"], **pdl_options(pdl),
    )  # fmt: skip


def tma_study(b: Buffers, reg: dict[str, Callable[..., None]]) -> dict[str, Any]:
    """The TMA-before-wait kernel per shape over (bn, bk, split, warps), then its layer chain against today's."""
    out: dict[str, Any] = {"check": {}, "grid": {}}
    for name, (n, k) in SHAPES.items():
        rows = []
        for bn in (64, 128):
            for bk in (64, 128, 256):
                for split in (1, 2, 4, 8, 16):
                    ks = k // split
                    if ks % bk or not 1 <= ks // bk <= 4 or ks // bk * bn > 256:
                        continue
                    for warps in (4, 8):
                        c = {"bn": bn, "bk": bk, "split": split, "warps": warps}
                        try:
                            kern = launch_tma(b.x[name], b.w[name][0], b.ws, c)
                            torch.cuda.synchronize()
                            got = b.ws[: split * 16 * n].view(split, 16, n)[:, :ROWS].sum(0)
                            err = float((got - b.x[name].float() @ b.w[name][0].float().T).abs().max())
                            us = per_launch_us(lambda i, c=c, nm=name: launch_tma(b.x[nm], b.w[nm][i], b.ws, c))
                            rows.append({**c, "us": us, "err": err, "regs": kern.n_regs, "spills": kern.n_spills,
                                         "smem": kern.metadata.shared})  # fmt: skip
                        except Exception as e:
                            print(f"  tma {name} {c}: {type(e).__name__}: {str(e)[:160]}", flush=True)
        rows.sort(key=lambda r: r["us"])
        out["grid"][name] = rows
        print(f"tma {name} best: {rows[:3]}", flush=True)
    best = {name: out["grid"][name][0] for name in SHAPES if out["grid"][name]}
    if len(best) == len(SHAPES):
        names = list(SHAPES)
        out["chain_reg_us"] = 1e3 * time_graph(lambda: [reg[n](i) for i in range(DEPTH) for n in names]) / DEPTH
        out["chain_tma_us"] = (
            1e3
            * time_graph(lambda: [launch_tma(b.x[n], b.w[n][i], b.ws, best[n]) for i in range(DEPTH) for n in names])
            / DEPTH
        )
        print(f"layer chain (4 GEMMs): reg {out['chain_reg_us']:.2f} us, tma {out['chain_tma_us']:.2f} us", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="write the JSON result here")
    args = p.parse_args()
    b = Buffers()
    reg = reg_launchers(b)
    res: dict[str, Any] = {"env": environment(), "reg_us": {name: per_launch_us(fn) for name, fn in reg.items()}}
    print("reg (today's kernels, us per launch):", res["reg_us"], flush=True)
    res["tma"] = tma_study(b, reg)
    dump(res, args.out)


if __name__ == "__main__":
    main()
