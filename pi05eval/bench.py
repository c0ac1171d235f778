"""Latency benchmark of one LIBERO-shaped Pi0.5 call, without the simulator.

    python -m pi05eval.bench --engines eager compile --steps 10 --calls 100 --out benchmarks/h200.json

Full-size random weights by default (`--bundle DIR` times a policy bundle's weights; the prompt tokens are random
either way). Per configuration: build time (apart), warm-up (excluded), then timed calls from host inputs to host
actions (CUDA synchronized; wall p50/p90/p99/mean/max) with CUDA-event times per stage, peak memory, and the max abs
difference of the actions against eager bf16 and eager fp32 on the same inputs and noise. Ratios are against eager
bf16 in the same run. Prints a table, then the whole result as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from pi05eval.engines import EngineSpec, build_engine, parse_engine_spec
from pi05eval.errors import run_command
from pi05eval.metrics import latency_summary
from pi05eval.model import Pi05Model, get_config

log = logging.getLogger("pi05eval.bench")
LIBERO_DIMS = 7  # action dims LIBERO executes (fidelity is measured on these)


def random_model(variant: str, device: torch.device, seed: int = 0, overrides: dict | None = None) -> Pi05Model:
    """A full-size (or any variant) model with random weights of sane scale, built directly on `device`."""
    with torch.device("meta"):
        model = Pi05Model(get_config(variant, **(overrides or {})))
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, math.prod(p.shape[1:]) ** -0.5, generator=gen)
                if ".dense." in name:
                    p.mul_(0.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02, generator=gen)
            elif "vision" in name and "norm" in name:
                p.normal_(1.0, 0.1, generator=gen)  # LayerNorm gamma
            else:
                p.normal_(0.0, 0.1, generator=gen)  # RMSNorm scale, used as (1 + w)
    return model.eval()


def bundle_model(source: str, device: torch.device) -> Pi05Model:
    """A policy bundle's model (local dir, `hf:<repo>`, `gs://...`), its checkpoint checked and loaded in bf16."""
    from pi05eval.model.weights import load_pi05
    from pi05eval.policy.bundle import resolve_bundle

    bundle = resolve_bundle(source)
    return load_pi05(bundle.weights, bundle.model_config, precision="bf16", device=device)


def libero_inputs(cfg, batch: int, prompt_len: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Host tensors shaped like a LIBERO call: 2 images + a masked third, a `prompt_len`-token prompt padded to 200."""
    g = torch.Generator().manual_seed(seed)
    size = cfg.image_size
    images = torch.randint(0, 256, (batch, cfg.num_images, 3, size, size), generator=g).float() / 127.5 - 1.0
    images[:, 2] = 0.0
    image_masks = torch.tensor([[True, True, False]]).repeat(batch, 1)
    tokens = torch.zeros(batch, cfg.max_token_len, dtype=torch.int64)
    tokens[:, :prompt_len] = torch.randint(3, cfg.vocab_size, (batch, prompt_len), generator=g)
    tokens[:, 0] = 2  # <bos>
    token_mask = torch.zeros(batch, cfg.max_token_len, dtype=torch.bool)
    token_mask[:, :prompt_len] = True
    noise = torch.randn(batch, cfg.action_horizon, cfg.action_dim, generator=g)
    return images, image_masks, tokens, token_mask, noise


def time_engine(engine, inputs, warmup: int, calls: int) -> dict[str, Any]:
    """Warm-up then `calls` timed calls: host inputs in, host actions out."""
    for _ in range(warmup):
        engine.sample_actions(*inputs).cpu()
    wall, stages = [], {}
    out = None
    for _ in range(calls):
        t0 = time.perf_counter()
        out = engine.sample_actions(*inputs).cpu()  # .cpu() synchronizes
        wall.append((time.perf_counter() - t0) * 1e3)
        for k, v in engine.stage_ms().items():
            stages.setdefault(k, []).append(v)
    return {
        "wall_ms": latency_summary(wall),
        "stage_ms": {k: latency_summary(v) for k, v in stages.items()},
        "raw_ms": [round(x, 4) for x in wall],
        "actions": out,
    }


def run_config(
    model, spec: EngineSpec, inputs, args, refs: dict[str, torch.Tensor], precision: str = "bf16", held_out=None
) -> dict[str, Any]:
    """Build, time and check one engine spec; `held_out` = (inputs list, eager bf16 actions list) for fidelity."""
    dev = model.action_in.weight.device
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    engine = build_engine(spec, model, args.steps, batch_size=inputs[0].shape[0], precision=precision)
    engine.prepare([int(inputs[3].sum(dim=1).max())])
    build_s = time.perf_counter() - t0
    res = time_engine(engine, inputs, args.warmup, args.calls)
    actions = res.pop("actions")
    if held_out is not None:
        from pi05eval.precision.fidelity import agreement

        outs = [engine.sample_actions(*x)[0, :, :LIBERO_DIMS].float().cpu().numpy() for x in held_out[0]]
        res["fidelity_vs_eager_bf16"] = agreement(held_out[1], outs)
    res.update(
        precision=precision,
        name=spec.label if precision == "bf16" else f"{spec.label}@{precision}",
        spec=asdict(spec),
        build_s=build_s,
        cache_loaded=bool(getattr(engine, "cache_loaded", False)),
        # whether the denoise ran as the hand-fused Triton kernels (a shortcut they need, switched off, falls back)
        triton_denoise=bool(getattr(engine, "triton", False)),
        peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None,
        max_abs_diff={k: float((actions - ref).abs().max()) for k, ref in refs.items()},
        calls_per_s=1e3 * inputs[0].shape[0] / res["wall_ms"]["p50"],
    )
    return res


def capture_graph(fn: Callable[[], Any], warmup: int = 2) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Warm `fn` up on a side stream (compiles kernels), then capture it as one CUDA graph -> (graph, its output)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def graph_replay_ms(graph: torch.cuda.CUDAGraph, replays: int, warmup: int = 10) -> list[float]:
    """CUDA-event ms of `replays` back-to-back replays of `graph` (after `warmup` untimed ones)."""
    for _ in range(warmup):
        graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(replays)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def graph_median_ms(fn: Callable[[], Any], replays: int, warmup: int = 10) -> float:
    """Median CUDA-event ms of one replay of `fn` captured as a CUDA graph (`capture_graph`, `graph_replay_ms`)."""
    graph, _ = capture_graph(fn)
    ms = sorted(graph_replay_ms(graph, replays, warmup))
    return ms[len(ms) // 2]


def profile_kernels(
    model, spec: EngineSpec, inputs, steps: int, path: str | None, precision: str = "bf16"
) -> dict[str, Any]:
    """Kernels launched by one call of `spec` run without CUDA graphs (graph replays hide them from the profiler),
    then the aten ops that launched GPU work (the extern kernels of compiled code: GEMMs, attention) by input shape."""
    from torch.profiler import ProfilerActivity, profile

    spec = EngineSpec(spec.name, spec.shortcuts, {**spec.options, "cuda_graph": False})
    engine = build_engine(spec, model, steps, batch_size=inputs[0].shape[0], precision=precision)
    for _ in range(3):
        engine.sample_actions(*inputs).cpu()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        engine.sample_actions(*inputs).cpu()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=70)
    ops = [e for e in prof.key_averages(group_by_input_shape=True) if e.key.startswith("aten::")]
    ops = sorted((e for e in ops if e.device_time_total), key=lambda e: -e.device_time_total)
    op_rows = [f"{e.key:40s} {e.count:5d} {e.device_time_total:10.1f}  {e.input_shapes}" for e in ops[:40]]
    if path:
        with open(path, "w") as f:
            f.write(f"{table}\n\naten ops with GPU work (name, calls, total µs, input shapes):\n")
            f.write("\n".join(op_rows) + "\n")
    return {"spec": spec.label, "kernels_per_call": len(events), "kernel_ms": sum(e.device_time for e in events) / 1e3}


def save_partial(path: str | None, results: list[dict[str, Any]]) -> None:
    """What finished so far (a long run cut short by a time limit keeps its results)."""
    if path:
        with open(path + ".partial", "w") as f:
            json.dump(
                {"env": environment(), "results": [{k: v for k, v in r.items() if k != "raw_ms"} for r in results]}, f
            )


def environment() -> dict[str, Any]:
    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "argv": sys.argv,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = list(torch.cuda.get_device_capability())
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def format_rows(results: list[dict[str, Any]], base: float | None) -> str:
    head = (
        "config",
        "batch",
        "steps",
        "p50 ms",
        "p90",
        "p99",
        "max",
        "vision",
        "prefill",
        "denoise",
        "Triton step",
        "x eager",
        "calls/s",
        "build s",
        "mem GiB",
        "|Δ| bf16",
        "|Δ| fp32",
        "x bf16",
        "cos held-out",
    )
    rows = [head]
    for r in results:
        w, s = r["wall_ms"], r["stage_ms"]
        rows.append(
            (
                r["name"],
                str(r["batch"]),
                str(r["steps"]),
                f"{w['p50']:.2f}",
                f"{w['p90']:.2f}",
                f"{w['p99']:.2f}",
                f"{w['max']:.2f}",
                *(f"{s[k]['p50']:.2f}" if k in s else "-" for k in ("vision", "prefill", "denoise")),
                "yes" if r.get("triton_denoise") else "no",
                f"{base / w['p50']:.1f}" if base else "-",
                f"{r['calls_per_s']:.1f}",
                f"{r['build_s']:.1f}",
                f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] else "-",
                *(f"{r['max_abs_diff'].get(k, float('nan')):.2e}" for k in ("eager_bf16", "eager_fp32")),
                f"{r['speedup_vs_bf16_same_engine']:.2f}" if r.get("speedup_vs_bf16_same_engine") else "-",
                f"{r['fidelity_vs_eager_bf16']['cosine']:.5f}" if r.get("fidelity_vs_eager_bf16") else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="pi05", help="model variant with random weights (pi05 | tiny)")
    p.add_argument("--bundle", help="time a policy bundle's weights instead (local dir, hf:<repo>, gs://...)")
    p.add_argument(
        "--engines",
        nargs="+",
        default=["eager", "compile"],
        help="engine specs: eager | compile | compile:-trim_prefix,-cuda_graph,mode=default",
    )
    p.add_argument("--steps", type=int, nargs="+", default=[10])
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--prompt-len", type=int, default=30, help="valid prompt tokens (LIBERO prompts: ~15-30)")
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--no-fp32-ref", action="store_true", help="skip the fp32 reference (saves memory and time)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="write the JSON result here")
    p.add_argument("--profile", help="also profile the kernels of the last engine spec; table written to this file")
    p.add_argument(
        "--precisions",
        nargs="*",
        default=[],
        help="precision presets (conf/policy/precision/*.yaml) or inline 'prefix.mlp=fp8,...' to run "
        "on every non-eager engine spec, besides bf16; batch 1 only",
    )
    p.add_argument("--profile-precision", help="profile the last engine spec on this precision preset too")
    p.add_argument("--calib", help="calibration observations (.npz written by pi05eval.precision.calibration)")
    p.add_argument("--calib-n", type=int, default=32, help="calls fed to calibration")
    p.add_argument("--holdout", type=int, default=8, help="further calls for fidelity vs eager bf16")
    p.add_argument("--eager-quantized", action="store_true", help="also time the quantized model eagerly")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    dev = torch.device(args.device)
    specs = [parse_engine_spec(s) for s in args.engines]
    model = bundle_model(args.bundle, dev) if args.bundle else random_model(args.variant, dev)
    weights = f"bundle {args.bundle}" if args.bundle else f"random {args.variant}"
    results: list[dict[str, Any]] = []
    for batch in args.batch:
        inputs = libero_inputs(model.cfg, batch, args.prompt_len)
        for steps in args.steps:
            refs: dict[str, torch.Tensor] = {}
            dev_inputs = [x.to(dev) for x in inputs]
            if not args.no_fp32_ref:
                model.set_precision("fp32")
                refs["eager_fp32"] = model.sample_actions(*dev_inputs, num_steps=steps).cpu()
            model.set_precision("bf16")
            refs["eager_bf16"] = model.sample_actions(*dev_inputs, num_steps=steps).cpu()
            for spec in specs:
                try:
                    r = run_config(model, spec, inputs, argparse.Namespace(**{**vars(args), "steps": steps}), refs)
                except Exception as e:  # one config failing must not lose the others
                    log.exception("%s batch %d steps %d failed", spec.label, batch, steps)
                    results.append({"name": spec.label, "error": repr(e), "batch": batch, "steps": steps})
                    continue
                r.update(batch=batch, steps=steps)
                results.append(r)
                save_partial(args.out, results)
                log.info("%s batch %d steps %d: p50 %.2f ms", r["name"], batch, steps, r["wall_ms"]["p50"])
            if args.precisions and batch == 1:
                from pi05eval.bench_precision import calibration_inputs, run_precision

                calib = calibration_inputs(model.cfg, args.calib_n + args.holdout, args.prompt_len, args.calib)
                step_args = argparse.Namespace(**{**vars(args), "steps": steps})
                for name in args.precisions:
                    try:
                        rs = run_precision(model, name, specs, inputs, step_args, refs, calib)
                    except Exception as e:  # one preset failing (e.g. hardware) must not lose the others
                        log.exception("precision %s failed", name)
                        results.append({"name": f"@{name}", "error": repr(e), "batch": batch, "steps": steps})
                        continue
                    for r in rs:
                        r.update(batch=batch, steps=steps)
                        log.info("%s: p50 %.2f ms", r["name"], r["wall_ms"]["p50"])
                    results.extend(rs)
                    save_partial(args.out, results)
    timed = [r for r in results if "wall_ms" in r]
    for r in timed:  # ratios against eager bf16, and the same spec in bf16, of the same batch and steps
        same = [x for x in timed if (x["batch"], x["steps"]) == (r["batch"], r["steps"])]
        base = next((x for x in same if x["name"] == "eager"), None)
        r["speedup_vs_eager"] = base["wall_ms"]["p50"] / r["wall_ms"]["p50"] if base else None
        bf16 = next((x for x in same if x["name"] == r["name"].split("@")[0]), None)
        r["speedup_vs_bf16_same_engine"] = bf16["wall_ms"]["p50"] / r["wall_ms"]["p50"] if bf16 else None
    out = {"env": environment(), "prompt_len": args.prompt_len, "weights": weights, "results": results}
    if args.profile and dev.type == "cuda":
        out["profile"] = profile_kernels(
            model, specs[-1], libero_inputs(model.cfg, 1, args.prompt_len), args.steps[-1], args.profile
        )
        print(f"profile: {out['profile']}")
    for batch in args.batch:
        for steps in args.steps:
            sub = [r for r in timed if (r["batch"], r["steps"]) == (batch, steps)]
            base = next((r["wall_ms"]["p50"] for r in sub if r["name"] == "eager"), None)
            print(format_rows(sub, base))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    for r in results:
        if "error" in r:
            print(f"FAILED {r['name']}: {r['error']}")
    print(json.dumps({**out, "results": [{k: v for k, v in r.items() if k != "raw_ms"} for r in results]}))
    return out


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    run_command(main)
