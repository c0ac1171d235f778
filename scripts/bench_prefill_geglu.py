"""Micro-benchmark: the prefill's gate|up GEMM with GeGLU in its epilogue (Triton) against cuBLAS + a GeGLU pass.

    PYTHONPATH=$PWD python scripts/bench_prefill_geglu.py --out geglu.json

The engine's prefill runs gate|up as one cuBLAS GEMM ([544, 2048] x [2048, 32768] for Pi0.5, batch 1) and then
inductor's GeGLU pass over its output. Here the weight rows are pair-interleaved (gate j, up j adjacent,
`pi05eval.kernels.config.interleave_gate_up`), so one GEMM tile holds both halves of its outputs and the epilogue
writes gelu_tanh(gate) * up directly (roundings as the PyTorch path: GEMM output, gelu, product in bf16). Kernels
(`pi05eval.kernels.geglu_triton`, the engine's `triton_geglu`): pointer loads, or TMA descriptors in a persistent loop
(optionally warp-specialized), over (bm, bn, bk, stages, warps) in a shuffled order until the time budget. Each
candidate is timed as `--layers` launches with distinct weights in one CUDA graph (median of replays) and checked
against the PyTorch result.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import time
from typing import Any

import torch
import torch.nn.functional as F
import triton

from pi05eval.bench import environment, graph_median_ms
from pi05eval.kernels.config import interleave_gate_up
from pi05eval.kernels.geglu_triton import geglu_gemm_ptr_kernel, geglu_gemm_tma_kernel


def launcher(kind: str, x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, cfg: dict[str, Any]):
    """-> a no-argument launch of one candidate kernel on (x, w, out)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    (m, k), n2 = x.shape, w.shape[0]
    bm, bn, bk = cfg["bm"], cfg["bn"], cfg["bk"]
    num_m = triton.cdiv(m, bm)
    tiles = num_m * (n2 // bn)
    shape = {"K": k, "N2": n2, "BM": bm, "BN": bn, "BK": bk, "NUM_M": num_m}
    if kind == "ptr":
        launch = {"num_warps": cfg["warps"], "num_stages": cfg["stages"]}
        return lambda: geglu_gemm_ptr_kernel[(tiles,)](x, w, out, m, **shape, DOT_PREC="tf32", **launch)
    descs = (
        TensorDescriptor.from_tensor(x, [bm, bk]),
        TensorDescriptor.from_tensor(w, [bn, bk]),
        TensorDescriptor.from_tensor(out, [bm, bn // 2]),
    )
    programs = min(torch.cuda.get_device_properties(x.device).multi_processor_count, tiles)
    ws = kind == "tma_ws"
    kw = {"STAGES": cfg["stages"], "PROGRAMS": programs, "WS": ws, "num_warps": cfg["warps"]}
    return lambda: geglu_gemm_tma_kernel[(programs,)](*descs, **shape, **kw)


def reference(x: torch.Tensor, w_gate_up: torch.Tensor) -> torch.Tensor:
    """The engine's math: one GEMM with [gate; up] rows, then gelu_tanh(gate) * up in bf16."""
    gate, up = (x @ w_gate_up.T).chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="write the JSON result here")
    p.add_argument("--shape", default="544,2048,16384", help="rows, width, MLP size (Pi0.5's prefill, batch 1)")
    p.add_argument("--layers", type=int, default=17, help="launches with distinct weights per timed graph")
    p.add_argument("--budget-s", type=float, default=300.0, help="stop trying candidates after this long")
    p.add_argument("--replays", type=int, default=50)
    args = p.parse_args(argv)
    m, k, f = (int(v) for v in args.shape.split(","))
    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    xs = [torch.randn(m, k, device=dev).to(dt) for _ in range(args.layers)]
    ws = [(torch.randn(2 * f, k, device=dev) * k**-0.5).to(dt) for _ in range(args.layers)]  # [gate; up] rows
    wi = [interleave_gate_up(w) for w in ws]
    ys = [torch.empty(m, 2 * f, device=dev, dtype=dt) for _ in ws]
    outs = [torch.empty(m, f, device=dev, dtype=dt) for _ in ws]
    ref = reference(xs[0], ws[0]).float()

    @torch.compile(fullgraph=True, dynamic=False)
    def geglu(y: torch.Tensor) -> torch.Tensor:
        gate, up = y.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up

    def per_layer_us(fn) -> float:
        return graph_median_ms(fn, args.replays) * 1e3 / args.layers

    res: dict[str, Any] = {"env": environment(), "shape": [m, k, f], "layers": args.layers}
    res["cublas_mm_us"] = per_layer_us(lambda: [torch.mm(x, w.T, out=y) for x, w, y in zip(xs, ws, ys, strict=True)])
    res["cublas_then_geglu_us"] = per_layer_us(lambda: [geglu(x @ w.T) for x, w in zip(xs, ws, strict=True)])
    print(json.dumps({k: v for k, v in res.items() if k != "env"}), flush=True)

    space = [
        {"kind": kind, "bm": bm, "bn": bn, "bk": bk, "stages": st, "warps": wp}
        for kind, bm, bn, bk, st, wp in itertools.product(
            ("ptr", "tma", "tma_ws"), (64, 128), (128, 256), (64, 128), (3, 4, 5), (4, 8)
        )
        if (bm + bn) * bk * 2 * st <= 200 * 1024  # operand stages that fit the shared memory
    ]
    random.Random(0).shuffle(space)
    start, tried = time.time(), []
    for cfg in space:
        if time.time() - start > args.budget_s:
            break
        row = dict(cfg)
        try:
            launches = [launcher(cfg["kind"], x, w, o, cfg) for x, w, o in zip(xs, wi, outs, strict=True)]
            launches[0]()
            row["max_abs"] = float((outs[0].float() - ref).abs().max())
            row["us"] = per_layer_us(lambda launches=launches: [fn() for fn in launches])
        except Exception as e:  # a tiling the compiler or the GPU refuses: recorded, next one
            row["error"] = f"{type(e).__name__}: {e}"[:200]
        tried.append(row)
        print(json.dumps(row), flush=True)
    ok = sorted((r for r in tried if "us" in r), key=lambda r: r["us"])
    res.update(tried=tried, best=ok[:5], untried=len(space) - len(tried))
    print("best:", json.dumps(ok[:5], indent=1))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)
    return res


if __name__ == "__main__":
    main()
