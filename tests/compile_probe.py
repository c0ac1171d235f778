"""Build the compile engine for a very small random Pi0.5 in a fresh process and report what happened (JSON).

Used by tests/test_engines.py to check compile-vs-eager agreement, the on-disk cache across processes, and that calls
under `torch.inference_mode` (as the policy makes them) compile nothing more than one graph per stage and bucket.
"""

from __future__ import annotations

import json
import sys

import torch
from torch._dynamo.utils import counters

from pi05eval.bench import libero_inputs, random_model
from pi05eval.engines.compile import CompiledEngine, CompileOptions

if __name__ == "__main__":
    torch.set_num_threads(1)
    model = random_model("tiny", torch.device("cpu"), overrides={"depth": 1, "vision_depth": 1, "vocab_size": 512})
    model.set_precision("bf16")
    inputs = libero_inputs(model.cfg, 1, prompt_len=12)
    ref = model.sample_actions(*inputs, num_steps=2)
    engine = CompiledEngine(model, 2, options=CompileOptions(cache_dir=sys.argv[1]))
    build_s = engine.prepare([12])
    out = engine.sample_actions(*inputs)
    graphs_one_bucket = counters["stats"]["unique_graphs"]
    # as the policy calls it: under inference mode, a built bucket and a new one (built there), then outside again
    with torch.inference_mode():
        engine.sample_actions(*inputs)
        longer = libero_inputs(model.cfg, 1, prompt_len=40)  # the 64 bucket
        engine.sample_actions(*longer)
    engine.sample_actions(*longer)
    print(
        json.dumps(
            {
                "cache_loaded": engine.cache_loaded,
                "fx_hits": counters["inductor"]["fxgraph_cache_hit"],
                "fx_misses": counters["inductor"]["fxgraph_cache_miss"],
                "build_s": build_s,
                "max_abs_diff": float((out - ref).abs().max()),
                "graphs_one_bucket": graphs_one_bucket,
                "graphs_two_buckets": counters["stats"]["unique_graphs"],
                "ref_scale": float(ref.abs().max()),
            }
        )
    )
