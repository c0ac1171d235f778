#!/usr/bin/env python
"""Write a random Pi0.5 checkpoint in openpi's PyTorch layout (bf16 safetensors), one tensor chunk at a time.

    python scripts/make_random_checkpoint.py /tmp/pi05_random.safetensors --variant pi05 --time-load

Peak memory is one chunk (<= 64 MiB of fp32), so the full-size file (~7.2 GB with the unused expert lm_head that
real openpi checkpoints carry) is written without ever holding the model. Values: matrices N(0, 1/fan_in),
biases N(0, 0.02^2), LayerNorm scales 1 + N(0, 0.1^2), RMSNorm scales N(0, 0.1^2) (used as 1 + w).
`--time-load` then measures `load_pi05` on it: cold (file evicted from the page cache) and warm, plus the time to
touch every page, and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from pi05eval.model import VARIANTS, Pi05Config, get_config, load_pi05
from pi05eval.model.weights import openpi_shapes

CHUNK_ELEMENTS = 16 * 1024 * 1024  # fp32 elements generated at once
SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def random_chunks(key: str, shape: tuple[int, ...], gen: torch.Generator) -> Iterator[torch.Tensor]:
    """The tensor for `key` as consecutive fp32 row blocks."""
    rows, row_size = shape[0], math.prod(shape[1:])
    if len(shape) >= 2:
        mean, std = 0.0, row_size**-0.5  # fan_in = everything but the output dim
    elif key.endswith(".bias"):
        mean, std = 0.0, 0.02
    elif "layer_norm" in key or "post_layernorm" in key:
        mean, std = 1.0, 0.1
    else:
        mean, std = 0.0, 0.1  # Gemma RMSNorm scale, applied as (1 + w)
    step = max(1, CHUNK_ELEMENTS // max(row_size, 1))
    for start in range(0, rows, step):
        n = min(step, rows - start)
        yield torch.empty((n, *shape[1:]), dtype=torch.float32).normal_(mean, std, generator=gen)


def write_streaming(path: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, seed: int) -> int:
    """Write a safetensors file tensor by tensor; returns its size in bytes."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    keys = sorted(shapes)
    header: dict[str, object] = {"__metadata__": {"format": "pt", "layout": "openpi", "random_seed": str(seed)}}
    offset = 0
    for key in keys:
        nbytes = math.prod(shapes[key]) * itemsize
        header[key] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shapes[key]),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for i, key in enumerate(keys):
            gen = torch.Generator().manual_seed(seed * 100_003 + i)
            for chunk in random_chunks(key, shapes[key], gen):
                f.write(chunk.to(dtype).reshape(-1).view(torch.uint8).numpy())
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(raw) + offset


def evict_from_page_cache(path: Path) -> None:
    """Drop the file's clean pages from the page cache (no root needed): the next read comes from disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def rss_gb() -> dict[str, float]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) / 1e6  # kB -> GB
    return fields


def touch_all(model: torch.nn.Module) -> float:
    """Read one element per 4 KiB page of every parameter (forces memory-mapped weights in); returns seconds."""
    start = time.perf_counter()
    for p in model.parameters():
        flat = p.detach().reshape(-1)
        float(flat[:: max(1, 4096 // p.element_size())].float().sum())
    return time.perf_counter() - start


def time_load(path: Path, cfg: Pi05Config) -> dict[str, object]:
    result: dict[str, object] = {}
    for label in ("cold", "warm"):
        if label == "cold":
            evict_from_page_cache(path)
        start = time.perf_counter()
        model = load_pi05(path, cfg, precision="bf16", device="cpu")
        result[f"{label}_load_s"] = round(time.perf_counter() - start, 3)
        result[f"{label}_touch_s"] = round(touch_all(model), 3)
        result[f"{label}_rss_gb"] = {k: round(v, 2) for k, v in rss_gb().items()}
        del model
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--variant", default="pi05", choices=sorted(VARIANTS))
    parser.add_argument("--vocab-size", type=int, default=None, help="override the config's vocab size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-unused", action="store_true", help="omit the unused gemma_expert.lm_head.weight")
    parser.add_argument("--time-load", action="store_true", help="then time load_pi05 on it (cold and warm)")
    args = parser.parse_args(argv)
    overrides = {} if args.vocab_size is None else {"vocab_size": args.vocab_size}
    cfg = get_config(args.variant, **overrides)
    shapes = openpi_shapes(cfg, include_unused=not args.no_unused)
    start = time.perf_counter()
    nbytes = write_streaming(args.out, shapes, torch.bfloat16, args.seed)
    report: dict[str, object] = {
        "path": str(args.out),
        "variant": args.variant,
        "tensors": len(shapes),
        "gb": round(nbytes / 1e9, 3),
        "write_s": round(time.perf_counter() - start, 1),
    }
    print(f"wrote {args.out}: {len(shapes)} tensors, {nbytes / 1e9:.2f} GB in {report['write_s']} s", file=sys.stderr)
    if args.time_load:
        report.update(time_load(args.out, cfg))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
