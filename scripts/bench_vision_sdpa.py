"""GPU A/B of SigLIP's attention backend inside the compiled vision stage (`FastPi05.vision`, 2 images, bf16).

    PYTHONPATH=$PWD python scripts/bench_vision_sdpa.py OUT.json

Each backend (default choice, flash, memory-efficient, cuDNN, math: decomposed by inductor) is forced with
`torch.nn.attention.sdpa_kernel` around the compiled stage, graph-captured, and timed over 100 replays (median ms);
max |Δ| of the image tokens vs the default choice.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from pi05eval.bench import capture_graph, environment, graph_replay_ms, random_model
from pi05eval.engines.fast import FastPi05

BACKENDS = {
    "default": None,
    "flash": [SDPBackend.FLASH_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "math": [SDPBackend.MATH],
}


def median_graph_ms(fn: Callable[[], torch.Tensor], replays: int = 100) -> tuple[float, torch.Tensor]:
    graph, out = capture_graph(fn, warmup=3)
    times = sorted(graph_replay_ms(graph, replays))
    return times[len(times) // 2], out


def main() -> None:
    model = random_model("pi05", torch.device("cuda")).set_precision("bf16")
    fast = FastPi05(model, 10)
    images = torch.randn(1, 2, 3, 224, 224, device="cuda")
    res: dict = {"env": environment()}
    ref = None
    for name, backends in BACKENDS.items():
        try:
            torch._dynamo.reset()

            def run(backends=backends) -> torch.Tensor:
                if backends is None:
                    return fast.vision(images)
                with sdpa_kernel(backends):
                    return fast.vision(images)

            compiled = torch.compile(run, fullgraph=True, dynamic=False)
            with torch.no_grad():
                t0 = time.perf_counter()
                compiled()
                build = time.perf_counter() - t0
                ms, out = median_graph_ms(compiled)
            ref = out.clone() if ref is None else ref
            res[name] = {"ms": ms, "build_s": build, "max_abs_vs_default": float((out - ref).abs().max())}
        except Exception as e:  # a backend that cannot run these shapes
            res[name] = {"error": str(e)[:300]}
        print(name, res[name], flush=True)
    with open(sys.argv[1], "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
