"""Micro-benchmark: the cost of one dependent launch in a chain, the floor under every denoise kernel.

    PYTHONPATH=$PWD python scripts/bench_launch_floor.py --out floor.json

A chain of `--kernels` launches in one CUDA graph; each program of launch k reads the whole output of launch k - 1
(`read` fp32 values through L2, as a GEMV reads its input row block), and writes its slice of launch k's output.
Modes: plain launches; programmatic dependent launches (PDL) that wait with griddepcontrol.wait; and PDL whose
programs instead spin on an arrival counter the previous launch's programs increment (release / acquire), polled
with ld.acquire by every thread of a program. µs per launch = graph replay time / kernels (median of replays); the
chain's last output is checked (every value = the number of launches).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from pi05eval.bench import environment, graph_median_ms

MODES = {"plain": 0, "pdl_wait": 1, "pdl_flag": 2}


@triton.jit
def _acquire_load(ptr):
    return tl.inline_asm_elementwise(
        "ld.acquire.gpu.global.b32 $0, [$1];", "=r,l", [ptr], dtype=tl.int32, is_pure=False, pack=1
    )


@triton.jit
def chain_kernel(buf, cnt, k, READ: tl.constexpr, PER: tl.constexpr, MODE: tl.constexpr):
    """buf fp32 [kernels + 1, READ]; cnt int32 [kernels + 1] (cnt[0] preset to the program count)."""
    pid = tl.program_id(0)
    if MODE >= 1:
        gdc_launch_dependents()
    if MODE == 1:
        gdc_wait()
    if MODE == 2:
        seen = _acquire_load(cnt + k - 1)
        while seen < tl.num_programs(0):
            seen = _acquire_load(cnt + k - 1)
        tl.debug_barrier()
    prev = tl.load(buf + (k - 1) * READ + tl.arange(0, READ), cache_modifier=".cg")
    mine = pid * PER + tl.arange(0, PER)
    old = tl.load(buf + (k - 1) * READ + mine, mask=mine < READ, other=0.0, cache_modifier=".cg")
    tl.store(buf + k * READ + mine, old + 1.0 + 0.0 * tl.sum(prev, axis=0), mask=mine < READ)
    if MODE == 2:
        tl.debug_barrier()  # every thread's store is issued before the (release) arrival
        tl.atomic_add(cnt + k, 1, sem="release", scope="gpu")


def chain_us(mode: str, kernels: int, programs: int, read: int, warps: int, replays: int) -> dict[str, Any]:
    buf = torch.zeros(kernels + 1, read, device="cuda")
    cnt = torch.zeros(kernels + 1, dtype=torch.int32, device="cuda")
    per = triton.next_power_of_2(triton.cdiv(read, programs))
    pdl = {"launch_pdl": True} if MODES[mode] else {}

    def run() -> None:
        cnt.zero_()
        cnt[0].fill_(programs)
        for k in range(1, kernels + 1):
            chain_kernel[(programs,)](buf, cnt, k, READ=read, PER=per, MODE=MODES[mode], num_warps=warps, **pdl)

    us = graph_median_ms(run, replays) * 1e3 / kernels
    written = min(read, programs * per)
    return {"us": round(us, 3), "ok": bool((buf[kernels, :written] == kernels).all())}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="write the JSON result here")
    p.add_argument("--kernels", type=int, default=200)
    p.add_argument("--replays", type=int, default=50)
    args = p.parse_args(argv)
    res: dict[str, Any] = {"env": environment(), "kernels": args.kernels, "rows": []}
    for programs, read, warps in ((64, 1024, 4), (132, 1024, 4), (132, 1024, 8), (132, 8192, 8)):
        row: dict[str, Any] = {"programs": programs, "read_fp32": read, "warps": warps}
        for mode in MODES:
            row[mode] = chain_us(mode, args.kernels, programs, read, warps, args.replays)
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)
    return res


if __name__ == "__main__":
    main()
