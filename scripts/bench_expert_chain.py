"""GPU measurements of the CUDA expert chain (`pi05eval/kernels/chain_cuda.py`) inside the 10-step denoise.

    PYTHONPATH=$PWD python scripts/bench_expert_chain.py --out chain.json [--splits 4,8,2,8 2,8,2,8]

Full-size random Pi0.5 in bf16, fake prefix K/V of 542 tokens, batch 1; every timing is the whole graph-captured
denoise (median of --replays replays), in one process:
1. today's Triton denoise and the chain (each --splits choice), |Δ| of the chain's actions from the Triton ones;
2. ablations: the chain compiled without its weight copies, grid barriers, MMA loops or adaRMS passes (results
   invalid; what each part costs);
3. clock stamps of one block at the phase boundaries of every launch (`CHAIN_PROBE`), median over the middle layers,
   in µs at the SM clock measured beside them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_triton_denoise import fake_prefix

from pi05eval.bench import environment, graph_median_ms, random_model
from pi05eval.engines.fast import FastPi05
from pi05eval.engines.triton_denoise import TritonDenoise
from pi05eval.kernels import ExpertKernelConfig

ABLATIONS = [("NO_COPY",), ("NO_SYNC",), ("NO_MMA",), ("NO_NORM",), ("NO_COPY", "NO_MMA", "NO_NORM"), ("GU_AT_START",)]
# (name, stamp before, stamp after) of the probe's clock stamps (expert_chain.cu, STAMP(k))
SPANS = [
    ("wait for the previous kernel", 0, 1),
    ("O + residual", 1, 2),
    ("barrier 1", 2, 3),
    ("adaRMS + gate|up weights ready", 3, 9),
    ("gate|up + GeGLU", 9, 4),
    ("barrier 2", 4, 5),
    ("down + residual", 5, 6),
    ("barrier 3", 6, 7),
    ("adaRMS + Q/K/V + RoPE", 7, 8),
]


def sm_clock_ghz() -> float:
    """The SM clock the stamps count (the device's nominal maximum; an H200 runs at it under this load)."""
    khz = getattr(torch.cuda.get_device_properties(0), "clock_rate", 0)
    return khz / 1e6 if khz else 1.98


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out")
    p.add_argument("--prefix-len", type=int, default=542)
    p.add_argument("--replays", type=int, default=50)
    p.add_argument("--splits", nargs="*", default=["4,8,2,8"], help="K splits of Q/K/V, O, gate|up, down")
    p.add_argument("--probe-blocks", default="1,64,132", help="blocks (1-based) whose clock stamps are read")
    args = p.parse_args(argv)
    res: dict[str, Any] = {"env": environment(), "args": vars(args)}
    model = random_model("pi05", torch.device("cuda")).set_precision("bf16")
    fast = FastPi05(model, 10)
    ks, vs, key_mask, noise = fake_prefix(model.cfg, 1, args.prefix_len, torch.bfloat16)

    def denoise(td: TritonDenoise):
        return lambda: fast.denoise(noise, ks, vs, key_mask, update=td.update)

    def timed(name: str, td: TritonDenoise) -> torch.Tensor:
        with torch.no_grad():
            ms = graph_median_ms(denoise(td), args.replays, warmup=3)
            out = denoise(td)()
        res.setdefault("timing_ms", {})[name] = ms
        print(f"{name:40s} {ms:8.3f} ms", flush=True)
        return out

    ref = timed("triton (default)", TritonDenoise(fast))
    chains = {}
    for sp in args.splits:
        splits = tuple(int(v) for v in sp.split(","))
        td = TritonDenoise(fast, ExpertKernelConfig(cuda_chain=True, chain_splits=splits))
        out = timed(f"chain splits {sp}", td)
        res.setdefault("chain_vs_triton_max_abs", {})[sp] = (out - ref).abs().max().item()
        chains[sp] = td
    td = chains[args.splits[0]]
    chain = td.chain(1)
    for switches in ABLATIONS:
        td._chains[chain.shape] = chain.variant(switches=switches)
        out = timed("chain with " + " ".join(switches), td)
        if switches == ("GU_AT_START",):
            res["gu_at_start_vs_triton_max_abs"] = (out - ref).abs().max().item()
    ghz = sm_clock_ghz()
    res["sm_clock_ghz"] = ghz
    res["probe_us"] = {}
    for blk in args.probe_blocks.split(","):
        probe = chain.variant(switches=(f"PROBE={blk}",))
        td._chains[chain.shape] = probe
        with torch.no_grad():
            denoise(td)()
        torch.cuda.synchronize()
        stamps = probe.barrier[2:].view(-1, 10).cpu().long()  # [launch, stamp]
        spans = {}
        for name, a, b in SPANS:
            d = [((stamps[i, b] - stamps[i, a]) % (1 << 32)).item() / ghz / 1e3 for i in range(2, stamps.shape[0] - 2)]
            spans[name] = statistics.median(d)
        res["probe_us"][blk] = spans
        rounded = {k: round(v, 2) for k, v in spans.items()}
        print(f"block {blk} (µs, median over the middle layers):", json.dumps(rounded), flush=True)
    td._chains[chain.shape] = chain
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"done in {time.perf_counter() - t0:.0f} s")
