"""GPU A/B of inductor settings on the compiled vision and prefill stages (`FastPi05`, bf16, batch 1).

    PYTHONPATH=$PWD python scripts/bench_inductor_knobs.py OUT.json [SETTING ...]   # default: all settings

Settings: inductor's defaults; one-pass row reductions up to 2048 wide (`pi05eval.engines.wide_rows`);
`triton.multi_kernel` (both reduction forms generated, the faster picked at run time; off in the engine: a second
process loading the compile cache fails in torch 2.11); `triton.enable_pdl`, `combo_kernels`, `max_autotune_pointwise`,
`aggressive_fusion` (each within 0.03 ms of the default on an H200). Measured earlier and dropped:
`coordinate_descent_tuning` (+ `benchmark_fusion`), see benchmarks/README.md.

Each setting compiles both stages from scratch (inductor's FX graph cache off), reports the compile seconds, then
times each stage graph-captured over 200 replays (median ms). Inputs: 2 images, a 30-token prompt in the 32 bucket.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import torch
from torch._inductor import config as inductor_config
from torch._inductor.choices import InductorChoices
from torch._inductor.virtualized import V

from pi05eval.bench import environment, graph_median_ms, random_model
from pi05eval.engines.fast import FastPi05
from pi05eval.engines.wide_rows import WideRowChoices

SETTINGS = {  # name: (inductor config patch, one-pass rows up to 2048)
    "default": ({}, False),
    "wide_row_reductions": ({}, True),
    "multi_kernel": ({"triton.multi_kernel": 1}, False),
    "wide_rows_and_multi_kernel": ({"triton.multi_kernel": 1}, True),
    # Triton kernels as programmatic dependent launches: each loads what its predecessor does not write, then waits
    "pdl": ({"triton.enable_pdl": True}, False),
    "combo_kernels": ({"combo_kernels": True}, False),  # independent kernels launched as one (horizontal fusion)
    "max_autotune_pointwise": ({"max_autotune_pointwise": True}, False),  # tile configs of non-GEMM kernels tried
    "aggressive_fusion": ({"aggressive_fusion": True}, False),
    "default_again": ({}, False),
}


def _has_setting(key: str) -> bool:
    obj: Any = inductor_config
    for part in key.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def main() -> None:
    dev = torch.device("cuda")
    model = random_model("pi05", dev).set_precision("bf16")
    fast = FastPi05(model, 10)
    images = torch.rand(1, 2, 3, 224, 224, device=dev) * 2 - 1
    img_mask = torch.ones(1, 2, dtype=torch.bool, device=dev)
    tokens = torch.randint(3, 1000, (1, 32), device=dev)
    token_mask = torch.arange(32, device=dev)[None] < 30
    res: dict = {"env": environment()}
    names = sys.argv[2:] or list(SETTINGS)
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown settings {unknown}; choose from {sorted(SETTINGS)}")
    with torch.no_grad():
        for name in names:
            knobs, wide_rows = SETTINGS[name]
            missing = [k for k in knobs if not _has_setting(k)]
            if missing:
                res[name] = {"skipped": f"this torch's inductor has no setting {missing}"}
                print(name, res[name], flush=True)
                continue
            torch._dynamo.reset()
            choices = WideRowChoices() if wide_rows else InductorChoices()
            with torch._inductor.config.patch({"fx_graph_cache": False, **knobs}), V.set_choices_handler(choices):
                t0 = time.perf_counter()
                vision = torch.compile(fast.vision, dynamic=False, fullgraph=True)
                prefill = torch.compile(fast.prefill, dynamic=False, fullgraph=True)
                img_tokens = vision(images)
                prefill(img_tokens, img_mask, tokens, token_mask)
                torch.cuda.synchronize()
                compile_s = time.perf_counter() - t0
                run_prefill = lambda p=prefill, t=img_tokens: p(t, img_mask, tokens, token_mask)  # noqa: E731
                res[name] = {
                    "vision_ms": graph_median_ms(lambda v=vision: v(images), 200),
                    "prefill_ms": graph_median_ms(run_prefill, 200),
                    "compile_s": compile_s,
                }
            print(name, res[name], flush=True)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
