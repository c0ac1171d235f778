"""GPU A/B of inductor settings on the compiled vision and prefill stages (`FastPi05`, bf16, batch 1).

    PYTHONPATH=$PWD python scripts/bench_inductor_knobs.py OUT.json

Each setting compiles both stages from scratch (inductor's FX graph cache off), reports the compile seconds, then
times each stage graph-captured over 200 replays (median ms). Inputs: 2 images, a 30-token prompt in the 32 bucket.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from pi05eval.bench import environment, graph_median_ms, random_model
from pi05eval.engines.fast import FastPi05

SETTINGS = {
    "default": {},
    "coordinate_descent": {"coordinate_descent_tuning": True},
    "coordinate_descent_and_benchmark_fusion": {"coordinate_descent_tuning": True, "benchmark_fusion": True},
    "default_again": {},
}


def main() -> None:
    dev = torch.device("cuda")
    model = random_model("pi05", dev).set_precision("bf16")
    fast = FastPi05(model, 10)
    images = torch.rand(1, 2, 3, 224, 224, device=dev) * 2 - 1
    img_mask = torch.ones(1, 2, dtype=torch.bool, device=dev)
    tokens = torch.randint(3, 1000, (1, 32), device=dev)
    token_mask = torch.arange(32, device=dev)[None] < 30
    res: dict = {"env": environment()}
    with torch.no_grad():
        for name, knobs in SETTINGS.items():
            torch._dynamo.reset()
            with torch._inductor.config.patch({"fx_graph_cache": False, **knobs}):
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
