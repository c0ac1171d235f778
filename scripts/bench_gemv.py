"""Micro-benchmark of the action expert's small-M GEMMs on the GPU: kernel designs side by side.

    PYTHONPATH=$PWD python scripts/bench_gemv.py --out gemv.json [--budget-s 240]   # bare streaming loop
    PYTHONPATH=$PWD python scripts/bench_gemv.py --reg-only --out reg.json         # today's kernels over their tiles
    PYTHONPATH=$PWD python scripts/bench_gemv.py --full --out full.json            # stream_triton's kernels
    PYTHONPATH=$PWD python scripts/bench_gemv.py --l2 --out l2.json                # L2 residency / L2 prefetch

One expert layer at M = 10 rows has four projections (N x K): qkv 2560 x 1024, o 1024 x 2048, gate|up 8192 x 1024,
down 1024 x 4096 (~35 MB of bf16 weights, ~8 us at full HBM bandwidth). Each kernel is timed as 18 launches (one per
layer, distinct weights: nothing stays in L2) captured in a CUDA graph with programmatic dependent launch (PDL),
so a time per launch includes its share of the launch gaps. Designs:

* `reg`     today's kernels (`pi05eval.kernels.expert_triton`): each program loads its whole weight tile (all of K or
            its K split) into registers before the PDL wait, with their epilogues (RoPE, GeGLU, split-K combine +
            residual); always timed at the default tiles, over a grid of (bn, split, warps) unless --full;
* `stream`  (default mode) a bare K loop over BK-wide chunks that Triton software-pipelines through shared memory
            (`num_stages`); the first PRE chunks loaded before the PDL wait; SWAP puts the weight on the MMA's A side
            ([BN, BK] @ [BK, BM]); fp32 partial sums stored, no epilogue: the main loop's cost alone; coordinate
            descent per shape, then the layer chain (qkv, o, gate|up, down) x 18 against `reg`;
* `--full`  `pi05eval.kernels.stream_triton`'s kernels (the streaming loop with the real epilogues), coordinate
            descent per shape, the layer chain against `reg`, and the best tiles as ExpertKernelConfig fields.
* `--l2`    `reg` with its weights L2-resident, and with bulk L2 prefetch of later weights (`l2_study`).
Weight tiles copied by TMA into shared memory: `bench_gemv_tma.py`.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from pi05eval.bench import capture_graph, environment, graph_replay_ms
from pi05eval.kernels import launch_gemm_residual, launch_norm_gemm
from pi05eval.kernels.expert_triton import pdl_options
from pi05eval.kernels.stream_triton import launch_gemm_residual_stream, launch_norm_gemm_stream

SHAPES = {"qkv": (2560, 1024), "o": (1024, 2048), "gu": (8192, 1024), "down": (1024, 4096)}
DEPTH = 18
ROWS = 10


@triton.jit
def stream_gemm_kernel(
    x_ptr,  # [M, K] act
    w_ptr,  # [N, K] act
    ws_ptr,  # fp32 [SPLIT, BM, N]
    M,
    K: tl.constexpr,
    N: tl.constexpr,
    SPLIT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    STAGES: tl.constexpr,
    PRE: tl.constexpr,
    SWAP: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    if USE_PDL:
        gdc_launch_dependents()
    KS: tl.constexpr = K // SPLIT
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rm = tl.arange(0, BM)
    k0 = tl.program_id(1) * KS + tl.arange(0, BK)
    w_ptrs = w_ptr + rn[:, None] * K + k0[None, :]  # [BN, BK]
    x_ptrs = x_ptr + rm[:, None] * K + k0[None, :]  # [BM, BK]
    row_ok = (rm < M)[:, None]
    acc = tl.zeros([BN, BM], tl.float32) if SWAP else tl.zeros([BM, BN], tl.float32)
    if PRE:
        w0 = tl.load(w_ptrs)
    if USE_PDL:
        gdc_wait()
    if PRE:
        x0 = tl.load(x_ptrs, mask=row_ok, other=0.0)
        acc = tl.dot(w0, tl.trans(x0), acc) if SWAP else tl.dot(x0, tl.trans(w0), acc)
    for k in tl.range(PRE * BK, KS, BK, num_stages=STAGES):
        w = tl.load(w_ptrs + k)
        x = tl.load(x_ptrs + k, mask=row_ok, other=0.0)
        acc = tl.dot(w, tl.trans(x), acc) if SWAP else tl.dot(x, tl.trans(w), acc)
    out = ws_ptr + tl.program_id(1) * BM * N
    if SWAP:
        tl.store(out + rm[None, :] * N + rn[:, None], acc)
    else:
        tl.store(out + rm[:, None] * N + rn[None, :], acc)


def launch_stream(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, c: dict[str, Any], pdl: bool = True) -> None:
    n, k = w.shape
    stream_gemm_kernel[(n // c["bn"], c["split"])](
        x, w, ws, x.shape[0], K=k, N=n, SPLIT=c["split"], BM=16, BN=c["bn"], BK=c["bk"], STAGES=c["stages"],
        PRE=c["pre"], SWAP=c["swap"], num_warps=c["warps"], **pdl_options(pdl),
    )  # fmt: skip


def check(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, c: dict[str, Any], pdl: bool = True) -> float:
    """Max |partial sums - torch| of one launch (fp32 reference on the same bf16 operands)."""
    n, _k = w.shape
    launch_stream(x, w, ws, c, pdl)
    got = ws[: c["split"] * 16 * n].view(c["split"], 16, n)[:, : x.shape[0]].sum(0)
    return float((got - x.float() @ w.float().T).abs().max())


def valid(shape: tuple[int, int], c: dict[str, Any]) -> bool:
    n, k = shape
    ks = k // c["split"]
    if "pre" not in c:  # stream_triton's kernels: the first chunk is always loaded before the wait
        return n % c["bn"] == 0 and ks % c["bk"] == 0 and c["bn"] <= 256
    return n % c["bn"] == 0 and ks % c["bk"] == 0 and ks >= c["bk"] * max(1, c["pre"])


def time_graph(fn: Callable[[], None], replays: int = 100) -> float:
    """Median ms of one replay of `fn` captured as a CUDA graph."""
    graph, _ = capture_graph(fn)
    return float(torch.tensor(graph_replay_ms(graph, replays)).median())


class Buffers:
    """Distinct weights per layer for each shape, one input and one partial-sum workspace."""

    def __init__(self) -> None:
        dt, dev = torch.bfloat16, "cuda"
        self.w = {name: [torch.randn(n, k, device=dev, dtype=dt) * 0.02 for _ in range(DEPTH)]
                  for name, (n, k) in SHAPES.items()}  # fmt: skip
        self.x = {name: torch.randn(ROWS, k, device=dev, dtype=dt) for name, (n, k) in SHAPES.items()}
        self.ws = torch.empty(16 * 16 * 8192, device=dev, dtype=torch.float32)  # split <= 16, 16 rows, N <= 8192
        # today's kernels: residual stream, modulation, RoPE tables, outputs, split-K workspaces and counters
        self.h = torch.randn(ROWS, 1024, device=dev, dtype=dt)
        self.mod = torch.randn(3 * 1024, device=dev) * 0.1
        self.cos = torch.randn(1, 1, ROWS, 256, device=dev, dtype=dt)
        self.sin = torch.randn(1, 1, ROWS, 256, device=dev, dtype=dt)
        self.qkv_out = torch.empty(ROWS, 2560, device=dev, dtype=dt)
        self.gu_out = torch.empty(ROWS, 4096, device=dev, dtype=dt)
        self.counters = torch.zeros(8192, device=dev, dtype=torch.int32)


def reg_launchers(b: Buffers, tiles: dict[str, dict[str, int]] | None = None) -> dict[str, Callable[..., None]]:
    """Today's four kernels of layer i (keyword arguments go to the launcher, e.g. prefetch); `tiles` per kernel:
    bn, split, warps (default: ExpertKernelConfig's)."""
    t = {"qkv": {"bn": 64, "split": 1, "warps": 8}, "o": {"bn": 64, "split": 4, "warps": 4},
         "gu": {"bn": 64, "split": 1, "warps": 8}, "down": {"bn": 64, "split": 4, "warps": 8}}  # fmt: skip
    t.update(tiles or {})
    common = {"eps": 1e-6, "mod_late": False, "pdl": True, "horizon": ROWS}
    gate = b.mod[2048:]
    return {
        "qkv": lambda i, **kw: launch_norm_gemm(
            b.h,
            b.mod,
            b.w["qkv"][i],
            b.qkv_out,
            b.ws,
            b.counters,
            cos=b.cos,
            sin=b.sin,
            head_dim=256,
            rope_cols=2304,
            **t["qkv"],
            **common,
            **kw,
        ),
        "o": lambda i, **kw: launch_gemm_residual(
            b.x["o"], b.w["o"][i], b.h, gate, b.ws, b.counters, pdl=True, **t["o"], **kw
        ),
        "gu": lambda i, **kw: launch_norm_gemm(
            b.h, b.mod, b.w["gu"][i], b.gu_out, b.ws, b.counters, **t["gu"], **common, **kw
        ),
        "down": lambda i, **kw: launch_gemm_residual(
            b.x["down"], b.w["down"][i], b.h, gate, b.ws, b.counters, pdl=True, **t["down"], **kw
        ),
    }


def reg_grid(b: Buffers) -> dict[str, list[dict[str, Any]]]:
    """Today's kernels over tiles (bn, split, warps), us per launch (inf: does not build)."""
    grid = {
        "qkv": ([16, 32, 64], [1, 2, 4, 8]),
        "o": ([16, 32, 64], [1, 2, 4, 8, 16]),
        "gu": ([16, 32, 64, 128], [1, 2, 4, 8]),
        "down": ([16, 32, 64], [4, 8, 16]),
    }
    out: dict[str, list[dict[str, Any]]] = {}
    for name, (bns, splits) in grid.items():
        rows = []
        for bn in bns:
            for split in splits:
                for warps in (4, 8):
                    tile = {"bn": bn, "split": split, "warps": warps}
                    try:
                        us = per_launch_us(reg_launchers(b, {name: tile})[name])
                    except Exception as e:
                        us = float("inf")
                        print(f"  reg {name} {tile}: {type(e).__name__}", flush=True)
                    rows.append({**tile, "us": us})
        rows.sort(key=lambda r: r["us"])
        out[name] = rows
        print(f"reg {name} best: {rows[:3]}", flush=True)
    return out


def per_launch_us(launch: Callable[[int], None]) -> float:
    return 1e3 * time_graph(lambda: [launch(i) for i in range(DEPTH)]) / DEPTH


def l2_study(b: Buffers) -> dict[str, Any]:
    """What L2 residency and bulk L2 prefetch (`pi05eval.kernels.prefetch`) change, us per launch of today's kernels:
    weights from HBM (18 distinct layers); one layer's weight 18 times (L2-resident after the first); each launch
    prefetching the next launch's weight, issued at the start / after the wait / at the end (prefetch_at 0 / 1 / 2);
    then the four-GEMM layer chain with each kernel prefetching the weight `ahead` GEMMs later, us per layer."""
    reg = reg_launchers(b)
    out: dict[str, Any] = {}
    for name, launch in reg.items():
        w = b.w[name]
        r = {"hbm": per_launch_us(launch), "l2_same_weight": per_launch_us(lambda i, f=launch: f(0))}
        for at in (0, 1, 2):
            r[f"prefetch_next_at{at}"] = per_launch_us(
                lambda i, f=launch, w=w, at=at: f(i, prefetch=w[(i + 1) % DEPTH], prefetch_at=at)
            )
        out[name] = r
        print(f"l2 {name}:", json.dumps({k: round(v, 2) for k, v in r.items()}), flush=True)
    seq = [(n, i) for i in range(DEPTH) for n in reg]
    chain = {"none": 1e3 * time_graph(lambda: [reg[n](i) for n, i in seq]) / DEPTH}
    for ahead in (1, 2, 3):
        for at in (0, 1, 2):

            def run(ahead: int = ahead, at: int = at) -> None:
                for j, (n, i) in enumerate(seq):
                    n2, i2 = seq[(j + ahead) % len(seq)]
                    reg[n](i, prefetch=b.w[n2][i2], prefetch_at=at)

            chain[f"ahead{ahead}_at{at}"] = 1e3 * time_graph(run) / DEPTH
    print("l2 layer chain, us per layer:", json.dumps({k: round(v, 2) for k, v in chain.items()}), flush=True)
    out["chain_us_per_layer"] = chain
    return out


SPACE = {
    "bn": [32, 64, 128, 16],
    "bk": [128, 64, 256],
    "stages": [3, 4, 6, 2],
    "warps": [4, 8],
    "split": [1, 2, 4, 8],
    "pre": [1, 0, 2],
    "swap": [1, 0],
}


def descend(name: str, launcher: Callable, space: dict[str, list], start: dict[str, Any], deadline: float):
    """Coordinate descent over `space` for one shape (two passes, stops at the deadline); launcher(c)(i) launches
    layer i's kernel with config c."""
    shape = SHAPES[name]
    tried: dict[str, float] = {}

    def cost(c: dict[str, Any]) -> float:
        key = json.dumps(c, sort_keys=True)
        if key not in tried:
            if not valid(shape, c) or time.perf_counter() > deadline:
                return float("inf")
            try:
                tried[key] = per_launch_us(launcher(c))
            except Exception as e:  # out of resources etc.
                print(f"  {name} {c}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                tried[key] = float("inf")
        return tried[key]

    best, best_us = dict(start), cost(start)
    for _ in range(2):
        for field, choices in space.items():
            for v in choices:
                cand = {**best, field: v}
                us = cost(cand)
                if us < best_us:
                    best, best_us = cand, us
                    print(f"  {name}: {best_us:.2f} us  {best}", flush=True)
    return {"best": best, "us": best_us, "tried": len(tried)}


def full_stream_launchers(b: Buffers) -> dict[str, Callable]:
    """name -> (config -> (layer -> launch)) of `stream_triton`'s kernels with their epilogues."""
    norm = {"horizon": ROWS, "eps": 1e-6, "pdl": True}
    rope = {"cos": b.cos, "sin": b.sin, "head_dim": 256, "rope_cols": 2304}
    gate = b.mod[2048:]

    def tiles(c: dict[str, Any]) -> dict[str, Any]:
        return {k: c[k] for k in ("bn", "split", "bk", "stages", "warps")} | {"swap": bool(c["swap"])}

    return {
        "qkv": lambda c: (
            lambda i: launch_norm_gemm_stream(
                b.h, b.mod, b.w["qkv"][i], b.qkv_out, b.ws, b.counters, **norm, **rope, **tiles(c)
            )
        ),
        "o": lambda c: (
            lambda i: launch_gemm_residual_stream(
                b.x["o"], b.w["o"][i], b.h, gate, b.ws, b.counters, pdl=True, **tiles(c)
            )
        ),
        "gu": lambda c: (
            lambda i: launch_norm_gemm_stream(b.h, b.mod, b.w["gu"][i], b.gu_out, b.ws, b.counters, **norm, **tiles(c))
        ),
        "down": lambda c: (
            lambda i: launch_gemm_residual_stream(
                b.x["down"], b.w["down"][i], b.h, gate, b.ws, b.counters, pdl=True, **tiles(c)
            )
        ),
    }


FULL_SPACE = {
    "split": [1, 2, 4, 8, 16],
    "bn": [16, 32, 64, 128],
    "bk": [64, 128, 256],
    "stages": [2, 3, 4],
    "warps": [4, 8],
    "swap": [1, 0],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out")
    p.add_argument("--full", action="store_true", help="stream_triton's kernels with their epilogues, per shape")
    p.add_argument("--reg-only", action="store_true", help="today's kernels over their tiles only")
    p.add_argument("--l2", action="store_true", help="L2 residency and L2 prefetch with today's kernels only")
    p.add_argument("--budget-s", type=float, default=240.0, help="time for the whole descent")
    args = p.parse_args()
    res: dict[str, Any] = {"env": environment()}
    b = Buffers()
    res["check"] = {
        f"swap{sw}_pre{pr}_split{sp}": check(
            b.x["down"],
            b.w["down"][0],
            b.ws,
            {"bn": 64, "bk": 128, "stages": 3, "warps": 4, "split": sp, "pre": pr, "swap": sw},
        )
        for sw in (0, 1)
        for pr in (0, 1)
        for sp in (1, 4)
    }
    print("max |stream - torch|:", json.dumps(res["check"]), flush=True)
    reg = reg_launchers(b)
    res["reg_us"] = {name: per_launch_us(fn) for name, fn in reg.items()}
    print("reg (today's kernels, us per launch):", json.dumps(res["reg_us"]), flush=True)
    if args.l2:
        res["l2"] = l2_study(b)
        return dump(res, args.out)
    if args.full:
        full = full_stream_launchers(b)
        t0 = time.perf_counter()
        res["full"] = {}
        for j, name in enumerate(SHAPES):
            deadline = t0 + args.budget_s * (j + 1) / len(SHAPES)
            start = {"bn": 64, "bk": 256, "stages": 3, "warps": 4, "split": 4, "swap": 1}
            res["full"][name] = descend(name, full[name], FULL_SPACE, start, deadline)
            print(f"full stream {name}: {res['full'][name]['us']:.2f} us {res['full'][name]['best']}", flush=True)
        best = {n: res["full"][n]["best"] for n in SHAPES}
        res["chain_reg_us"] = 1e3 * time_graph(lambda: [reg[n](i) for i in range(DEPTH) for n in SHAPES]) / DEPTH
        res["chain_full_us"] = (
            1e3 * time_graph(lambda: [full[n](best[n])(i) for i in range(DEPTH) for n in SHAPES]) / DEPTH
        )
        print(f"layer chain: reg {res['chain_reg_us']:.2f} us, full stream {res['chain_full_us']:.2f} us", flush=True)
        res["config"] = {"stream": True, "stages": best["gu"]["stages"], "swap": bool(best["gu"]["swap"])} | {
            f"{n}_{k}": best[n][k] for n in SHAPES for k in ("bn", "split", "bk", "warps")
        }
        return dump(res, args.out)
    res["reg_grid"] = reg_grid(b)
    if args.reg_only:
        return dump(res, args.out)
    res["weights_mb"] = {name: n * k * 2 / 1e6 for name, (n, k) in SHAPES.items()}
    t0 = time.perf_counter()
    res["stream"] = {}
    for j, name in enumerate(SHAPES):
        deadline = t0 + args.budget_s * (j + 1) / len(SHAPES)
        start = {"bn": 64, "bk": 128, "stages": 4, "warps": 4, "split": 2 if SHAPES[name][1] > 1024 else 1, "pre": 1,
                 "swap": 1}  # fmt: skip
        launcher = lambda c, n=name: lambda i: launch_stream(b.x[n], b.w[n][i], b.ws, c)  # noqa: E731
        res["stream"][name] = descend(name, launcher, SPACE, start, deadline)
        r = res["stream"][name]
        print(f"stream {name}: {r['us']:.2f} us ({res['weights_mb'][name] / r['us']:.2f} TB/s) {r['best']}", flush=True)
    names = list(SHAPES)
    res["chain_reg_us"] = 1e3 * time_graph(lambda: [reg[n](i) for i in range(DEPTH) for n in names]) / DEPTH
    best = {n: res["stream"][n]["best"] for n in names}
    res["chain_stream_us"] = (
        1e3
        * time_graph(lambda: [launch_stream(b.x[n], b.w[n][i], b.ws, best[n]) for i in range(DEPTH) for n in names])
        / DEPTH
    )
    print(f"layer chain (4 GEMMs): reg {res['chain_reg_us']:.2f} us, stream {res['chain_stream_us']:.2f} us")
    dump(res, args.out)


def dump(res: dict[str, Any], path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
