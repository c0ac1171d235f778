"""GPU benchmark of the Triton denoise (`TritonDenoise`) against the fast path (eager and torch.compile'd).

    PYTHONPATH=$PWD python scripts/bench_triton_denoise.py --out triton.json [--sweep-s 150] [--no-sweep]

Full-size random Pi0.5 in bf16 on CUDA, fake prefix K/V of P tokens (a few masked), batch 1, 10 Euler steps:
1. accuracy: max |Δ| of the 10-step result, Triton vs FastPi05 eager bf16 vs FastPi05 fp32, and of one step;
2. timing: the 10-step denoise captured in a CUDA graph, Triton (default config, and without PDL) vs
   `torch.compile(fast.update)` (as the compile engine does), 200 replays after warm-up, p50/p90/p99 ms
   (CUDA events); the launch floor (empty kernels back to back in a graph);
3. profile: the Triton graph's kernels (torch.profiler, top 15; with PDL a kernel's time includes its wait);
4. sweep (--sweep-s seconds at most, --no-sweep to skip): coordinate descent over ExpertKernelConfig (tiles,
   splits, warps, mod_late), each candidate timed as the whole graph-captured denoise; then the tuned config's
   timing and each kernel type's time alone (its 18 launches in a graph), and the config to paste;
5. registers / spills / shared memory of every compiled kernel variant.
Every section runs in its own try/except: a failure prints its traceback and the rest goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from pi05eval.bench import capture_graph, environment, graph_median_ms, graph_replay_ms, random_model
from pi05eval.engines.fast import FastPi05
from pi05eval.engines.triton_denoise import TritonDenoise
from pi05eval.kernels import ExpertKernelConfig

log = logging.getLogger("bench_triton_denoise")

SWEEP: dict[str, list] = {  # field -> candidates (coordinate descent on the whole denoise, in this order)
    "prefetch": [0, 1, 2, 3],
    "att_prefetch": [0, 1, 2, 3],
    "prefetch_at": [0, 1, 2],
    "gu_split": [1, 2, 4, 8],
    "gu_bn": [16, 32, 64, 128],
    "gu_warps": [4, 8, 16],
    "qkv_split": [1, 2, 4, 8],
    "qkv_bn": [16, 32, 64],
    "qkv_warps": [4, 8, 16],
    "down_split": [1, 2, 4, 8, 16],
    "down_bn": [16, 32, 64],
    "down_warps": [4, 8, 16],
    "o_split": [1, 2, 4, 8, 16],
    "o_bn": [16, 32, 64],
    "o_warps": [4, 8, 16],
    "att_bs": [32, 64, 128, 256],
    "att_dsplit": [1, 2, 4],
    "att_bm": [16, 32, 64],
    "att_warps": [4, 8, 16],
    "mod_late": [False, True],
    "stages": [2, 3, 4],
    "swap": [True, False],
    "gu_bk": [64, 128, 256],
    "down_bk": [64, 128, 256],
    "qkv_bk": [64, 128, 256],
    "o_bk": [64, 128, 256],
    "io_bn": [16, 32, 64],
    "atomic_residual": [False, True],
    "chain_splits": [(4, 8, 2, 8), (2, 8, 2, 8), (8, 8, 4, 8), (4, 8, 4, 8), (4, 4, 2, 4), (8, 8, 8, 8), (2, 4, 1, 4)],
}


@triton.jit
def _empty_kernel(x_ptr, USE_PDL: tl.constexpr):
    if USE_PDL:
        gdc_launch_dependents()
        gdc_wait()
    tl.store(x_ptr + tl.program_id(0), 0)


def section(name: str, out: dict[str, Any]) -> Callable:
    """Run the decorated function now; its result (or the traceback) goes to out[name]."""

    def run(fn: Callable) -> Callable:
        t0 = time.perf_counter()
        try:
            out[name] = fn()
        except Exception:
            tb = traceback.format_exc()
            print(f"[{name}] FAILED\n{tb}", flush=True)
            out[name] = {"error": tb}
        print(f"[{name}] {time.perf_counter() - t0:.1f} s", flush=True)
        return fn

    return run


def summary(ms: list[float]) -> dict[str, float]:
    t = torch.tensor(ms)
    q = torch.quantile(t, torch.tensor([0.5, 0.9, 0.99])).tolist()
    return {"p50": q[0], "p90": q[1], "p99": q[2], "mean": t.mean().item(), "min": t.min().item(), "n": len(ms)}


def fake_prefix(cfg, batch: int, prefix_len: int, dtype: torch.dtype, seed: int = 0):
    """K/V [depth, B, KV, P, hd], key mask [B, 1, P + H] (the last 12 prefix tokens and ~3% others masked), noise."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = (cfg.depth, batch, cfg.num_kv_heads, prefix_len, cfg.head_dim)
    ks = torch.randn(shape, generator=g, device="cuda").to(dtype)
    vs = torch.randn(shape, generator=g, device="cuda").to(dtype)
    pad = torch.rand(batch, prefix_len, generator=g, device="cuda") > 0.03
    pad[:, -12:] = False
    key_mask = torch.cat([pad, pad.new_ones(batch, cfg.action_horizon)], dim=1)[:, None]
    noise = torch.randn(batch, cfg.action_horizon, cfg.action_dim, generator=g, device="cuda")
    return ks, vs, key_mask, noise


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="write the JSON result here")
    p.add_argument("--prefix-len", type=int, default=542)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--replays", type=int, default=200)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--no-fp32", action="store_true", help="skip the fp32 reference")
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--sweep-s", type=float, default=150.0, help="stop sweeping after this many seconds")
    p.add_argument("--sweep-passes", type=int, default=2, help="passes over the fields (until --sweep-s)")
    p.add_argument("--sweep-fields", default="", help="comma-separated SWEEP fields to sweep (default: all)")
    p.add_argument("--config", default="{}", help="JSON ExpertKernelConfig overrides for the main runs")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.backends.cuda.matmul.allow_tf32 = False
    t_start = time.perf_counter()
    res: dict[str, Any] = {"env": environment(), "args": vars(args)}
    model = random_model("pi05", torch.device("cuda")).set_precision("bf16")
    cfg = model.cfg
    fast = FastPi05(model, args.steps)
    base = ExpertKernelConfig(**json.loads(args.config))
    td = TritonDenoise(fast, base)
    res["config"] = td.config_dict()
    ks, vs, key_mask, noise = fake_prefix(cfg, args.batch, args.prefix_len, torch.bfloat16)
    rows: list[tuple[str, dict[str, float]]] = []

    def rope_tables() -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, 1, H, hd] of the action tokens, as `FastPi05.denoise` computes them."""
        h = noise.shape[1]
        lengths = key_mask[:, 0, : key_mask.shape[-1] - h].sum(dim=1)
        return model._rope(lengths[:, None] + torch.arange(h, device="cuda"), model.expert.compute_dtype)

    @section("accuracy", res)
    def _accuracy() -> dict[str, float]:
        with torch.no_grad():
            ref = fast.denoise(noise, ks, vs, key_mask)
            tri = fast.denoise(noise, ks, vs, key_mask, update=td.update)
            again = fast.denoise(noise, ks, vs, key_mask, update=td.update)
            cos, sin = rope_tables()
            one_ref = fast.update(noise, fast.mods[0], cos, sin, ks, vs, key_mask)
            one_tri = td.update(noise, fast.mods[0], cos, sin, ks, vs, key_mask)
        out = {
            "triton_vs_eager_bf16": (tri - ref).abs().max().item(),
            "one_step_triton_vs_eager_bf16": (one_tri - one_ref).abs().max().item(),
            "triton_run_to_run": (tri - again).abs().max().item(),
            "action_scale": ref.abs().max().item(),
        }
        if not args.no_fp32:
            model.set_precision("fp32")
            try:
                with torch.no_grad():
                    ref32 = FastPi05(model, args.steps).denoise(noise, ks.float(), vs.float(), key_mask)
            finally:
                model.set_precision("bf16")
            out["triton_vs_fp32"] = (tri - ref32).abs().max().item()
            out["eager_bf16_vs_fp32"] = (ref - ref32).abs().max().item()
        print("accuracy:", json.dumps(out), flush=True)
        return out

    graphs: dict[str, Any] = {}

    def denoise_with(update) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.no_grad():
                return fast.denoise(noise, ks, vs, key_mask, update=update)

        return run

    @section("timing_triton", res)
    def _time_triton() -> dict[str, float]:
        graph, out = capture_graph(denoise_with(td.update))
        graphs["triton"] = (graph, out)
        stats = summary(graph_replay_ms(graph, args.replays))
        eager = denoise_with(td.update)()
        stats["graph_vs_eager_max_abs"] = (out - eager).abs().max().item()  # kernels are deterministic: 0
        rows.append(("triton", stats))
        return stats

    @section("timing_triton_no_pdl", res)
    def _time_triton_no_pdl() -> dict[str, float]:
        plain = td.with_config(dataclasses.replace(td.config, pdl=False))
        graph, out = capture_graph(denoise_with(plain.update))
        stats = summary(graph_replay_ms(graph, args.replays))
        if "triton" in graphs:
            stats["vs_pdl_max_abs"] = (out - graphs["triton"][1]).abs().max().item()
        rows.append(("triton, no PDL", stats))
        return stats

    @section("launch_floor", res)
    def _floor() -> dict[str, float]:
        """µs per launch of an empty 132-program Triton kernel, 90 back to back in a graph (one step's count)."""
        buf = torch.zeros(132, device="cuda")
        out = {}
        for pdl in (False, True):
            opts = {"launch_pdl": True} if pdl else {}
            ms = graph_median_ms(
                lambda pdl=pdl, opts=opts: [_empty_kernel[(132,)](buf, USE_PDL=pdl, **opts) for _ in range(90)], 50
            )
            out[f"us_per_launch_pdl_{pdl}"] = 1e3 * ms / 90
        print("launch floor:", json.dumps(out), flush=True)
        return out

    if not args.no_compile:

        @section("timing_compile", res)
        def _time_compile() -> dict[str, float]:
            compiled = torch.compile(fast.update, mode="default", fullgraph=True, dynamic=False)
            graph, out = capture_graph(denoise_with(compiled))
            stats = summary(graph_replay_ms(graph, args.replays))
            if "triton" in graphs:
                stats["vs_triton_max_abs"] = (out - graphs["triton"][1]).abs().max().item()
            rows.append(("compile (inductor)", stats))
            return stats

    @section("profile", res)
    def _profile() -> dict[str, Any]:
        from torch.profiler import ProfilerActivity, profile

        graph = graphs["triton"][0]
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            graph.replay()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)
        print(table, flush=True)
        kernels = {}
        for e in prof.key_averages():
            if getattr(e, "self_device_time_total", 0) > 0:
                kernels[e.key] = {"count": e.count, "total_us": e.self_device_time_total}
        return {"table": table, "kernels": kernels}

    @section("sweep", res)
    def _sweep() -> dict[str, Any]:
        """Coordinate descent over ExpertKernelConfig, each candidate timed as the whole graph-captured denoise."""
        if args.no_sweep:
            return {"skipped": True}
        best = dataclasses.asdict(td.config)
        tried: list[dict[str, Any]] = []
        deadline = time.perf_counter() + args.sweep_s

        def time_config(conf: dict[str, Any]) -> float:
            return graph_median_ms(denoise_with(td.with_config(ExpertKernelConfig(**conf)).update), 30, warmup=3)

        cur = time_config(best)
        start = cur
        fields = [f for f in args.sweep_fields.split(",") if f] or list(SWEEP)
        unknown = sorted(set(fields) - set(SWEEP))
        if unknown:
            raise ValueError(f"unknown --sweep-fields {unknown}; choose from {sorted(SWEEP)}")
        for name, values in [(f, SWEEP[f]) for _ in range(args.sweep_passes) for f in fields]:
            for v in values:
                if v == best[name] or time.perf_counter() > deadline:
                    continue
                conf = {**best, name: v}
                try:
                    ms = time_config(conf)
                except Exception as e:  # e.g. out of shared memory / registers
                    tried.append({name: v, "error": str(e)[:300]})
                    continue
                tried.append({name: v, "ms": ms})
                print(f"[sweep] {name}={v}: {ms:.3f} ms (best {cur:.3f})", flush=True)
                if ms < cur * 0.995:
                    cur, best = ms, conf
        out: dict[str, Any] = {"start_ms": start, "best_ms": cur, "best_config": best, "tried": tried}
        print(f"[sweep] {start:.3f} -> {cur:.3f} ms; best: ExpertKernelConfig(**{json.dumps(best)})", flush=True)
        tuned = td.with_config(ExpertKernelConfig(**best))
        graph, y = capture_graph(denoise_with(tuned.update))
        stats = summary(graph_replay_ms(graph, args.replays))
        if "triton" in graphs:
            stats["vs_default_max_abs"] = (y - graphs["triton"][1]).abs().max().item()
        rows.append(("triton tuned", stats))
        out["tuned_timing"] = stats
        cos, sin = rope_tables()
        per_kernel = {}
        for kernel in ("qkv", "attn", "o", "gu", "down"):  # µs per launch, its 18 launches alone in a graph
            ms = graph_median_ms(
                lambda k=kernel: tuned.run_layers(noise, fast.mods[0], cos, sin, ks, vs, key_mask, frozenset({k})),
                20,
                warmup=3,
            )
            per_kernel[kernel] = 1e3 * ms / cfg.depth
        print("[sweep] tuned, us per launch alone:", json.dumps(per_kernel), flush=True)
        out["per_kernel_alone_us"] = per_kernel
        return out

    @section("kernel_resources", res)
    def _resources() -> list[dict[str, Any]]:
        """Registers, spills and shared memory of every compiled variant of the denoise kernels."""
        from pi05eval.kernels.atomic_triton import gemm_accumulate_kernel, residual_norm_gemm_kernel
        from pi05eval.kernels.attention_triton import attention_kernel
        from pi05eval.kernels.expert_triton import gemm_residual_kernel, norm_gemm_kernel
        from pi05eval.kernels.step_triton import action_in_kernel, step_out_kernel

        out = []
        kernels = (norm_gemm_kernel, attention_kernel, gemm_residual_kernel, action_in_kernel, step_out_kernel,
                   residual_norm_gemm_kernel, gemm_accumulate_kernel)  # fmt: skip
        for kernel in kernels:
            for cache in kernel.device_caches.values():
                for compiled in cache[0].values():
                    try:
                        compiled._init_handles()
                    except Exception:  # a variant that failed to build (e.g. out of shared memory)
                        continue
                    meta = compiled.metadata
                    out.append({
                        "kernel": getattr(kernel, "__name__", str(kernel)), "warps": meta.num_warps,
                        "regs": compiled.n_regs, "spills": compiled.n_spills, "shared": meta.shared,
                        "constants": {str(k): v for k, v in compiled.src.constants.items() if isinstance(v, (int, str))}
                        if hasattr(compiled, "src") else None,
                    })  # fmt: skip
        for row in out:
            print("resources:", json.dumps(row, default=str), flush=True)
        return out

    res["total_s"] = time.perf_counter() - t_start
    print(f"\ndenoise, {args.steps} steps, batch {args.batch}, prefix {args.prefix_len}, CUDA graph, ms:")
    print(f"{'engine':>20} {'p50':>8} {'p90':>8} {'p99':>8} {'min':>8}")
    for name, s in rows:
        print(f"{name:>20} {s['p50']:8.3f} {s['p90']:8.3f} {s['p99']:8.3f} {s['min']:8.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
