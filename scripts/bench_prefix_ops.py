"""Micro-benchmarks of the vision and prefill stages' operations on the GPU (what the compile engine's graphs call).

    PYTHONPATH=$PWD python scripts/bench_prefix_ops.py --out prefix_ops.json

1. GEMMs: every projection shape of SigLIP (M = 512 rows: 2 images x 256 patches, with bias) and of the Gemma prefix
   (M = 544 rows: 512 image + 32 prompt tokens), each as its layers' launches with distinct weights in one CUDA graph,
   under cuBLAS and cuBLASLt (`torch.backends.cuda.preferred_blas_library`): us per launch and TFLOP/s;
2. SigLIP's MLP hidden size 4304 padded with zeros to 4352 (a multiple of 128) for fc1 and fc2;
3. prefix attention (8 query heads, 1 K/V head, head_dim 256, 544 keys of which the last 12 are padding), 17 layers
   in a graph: the engine's eager-math attention compiled by inductor vs flash attention through
   `torch.nn.attention.varlen.varlen_attn` with the valid length as cu_seq_k (K/V heads repeated where the
   installed version has no GQA), and `F.scaled_dot_product_attention` with the boolean mask on its cuDNN and
   memory-efficient backends (eager, K/V expanded to 8 heads); the max |difference| on the valid rows;
4. (--triton) the same attention with RoPE on the queries, as the engine runs it (q a view of the fused Q/K/V output,
   rotated then attended, compiled by inductor) vs `pi05eval.kernels.prefix_attention_triton` (rotation on load),
   over a grid of its tile sizes and key splits;
5. (--softmax) the prefix attention's softmax alone (scale, pad x pad mask, fp32 softmax, bf16 probabilities over
   [8 x 544, 544] logits): inductor's fused kernel vs `pi05eval.kernels.softmax_triton.masked_softmax` per tiling.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
from typing import Any

import torch
import torch.nn.functional as F

from pi05eval.bench import environment, graph_median_ms
from pi05eval.model.attention import attention

DEV, DT = "cuda", torch.bfloat16
SHAPES = {  # name: (M, K, N, bias, launches)
    "vision_qkv": (512, 1152, 3456, True, 27),
    "vision_o": (512, 1152, 1152, True, 27),
    "vision_fc1": (512, 1152, 4304, True, 27),
    "vision_fc2": (512, 4304, 1152, True, 27),
    "vision_fc1_pad4352": (512, 1152, 4352, True, 27),
    "vision_fc2_pad4352": (512, 4352, 1152, True, 27),
    "prefill_qkv": (544, 2048, 2560, False, 18),
    "prefill_o": (544, 2048, 2048, False, 17),
    "prefill_gate_up": (544, 2048, 32768, False, 17),
    "prefill_down": (544, 16384, 2048, False, 17),
}


def median_us(fn, launches: int) -> float:
    """Median µs per launch of `fn` (`launches` launches) replayed as a CUDA graph."""
    return 1e3 * graph_median_ms(fn, 30) / launches


def gemms() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for lib in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(lib)
        for name, (m, k, n, bias, launches) in SHAPES.items():
            x = torch.randn(m, k, device=DEV, dtype=DT)
            ws = [torch.randn(n, k, device=DEV, dtype=DT) * 0.02 for _ in range(launches)]
            bs = [torch.randn(n, device=DEV, dtype=DT) if bias else None for _ in range(launches)]
            us = median_us(lambda x=x, ws=ws, bs=bs: [F.linear(x, w, b) for w, b in zip(ws, bs, strict=True)], launches)
            out[f"{lib}/{name}"] = {"us": round(us, 2), "tflops": round(2 * m * k * n / us / 1e6, 1)}
            print(lib, name, out[f"{lib}/{name}"], flush=True)
    torch.backends.cuda.preferred_blas_library("cublas")
    return out


def prefix_attention() -> dict[str, Any]:
    from torch.nn.attention.varlen import varlen_attn

    p, valid, heads, hd, layers = 544, 532, 8, 256, 17
    g = torch.Generator(device=DEV).manual_seed(0)
    q = torch.randn(1, heads, p, hd, device=DEV, dtype=DT, generator=g)
    k = torch.randn(1, 1, p, hd, device=DEV, dtype=DT, generator=g)
    v = torch.randn(1, 1, p, hd, device=DEV, dtype=DT, generator=g)
    pad = torch.arange(p, device=DEV)[None] < valid  # [1, P]
    mask = pad[:, None, :] & pad[:, :, None]
    ref = attention(q, k, v, mask, hd**-0.5)  # [1, P, H * hd]
    cu_q = torch.tensor([0, p], dtype=torch.int32, device=DEV)
    gqa = "enable_gqa" in inspect.signature(varlen_attn).parameters

    def flash(q, k, v, pad):
        qq, kk, vv = (t[0].transpose(0, 1) for t in (q, k, v))  # [P, heads, hd]
        if not gqa:
            kk, vv = kk.expand(p, heads, hd).contiguous(), vv.expand(p, heads, hd).contiguous()
        cu_k = torch.cat([pad.new_zeros(1, dtype=torch.int32), pad.sum(dim=1, dtype=torch.int32)])
        out = varlen_attn(qq, kk, vv, cu_q, cu_k, p, p, scale=hd**-0.5, **({"enable_gqa": True} if gqa else {}))
        return out.reshape(1, p, heads * hd)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdpa_mask = (mask | torch.eye(p, dtype=torch.bool, device=DEV))[:, None]  # [1, 1, P, P]: pad rows see themselves
    kx, vx = k.expand(1, heads, p, hd), v.expand(1, heads, p, hd)

    def sdpa(q, kx, vx, m):
        return F.scaled_dot_product_attention(q, kx, vx, attn_mask=m, scale=hd**-0.5).transpose(1, 2).reshape(1, p, -1)

    math_c = torch.compile(lambda q, k, v, m: attention(q, k, v, m, hd**-0.5), fullgraph=True)
    flash_c = torch.compile(flash, fullgraph=True)
    out = {
        "varlen_has_gqa": gqa,
        "flash_vs_math_max_abs_valid_rows": float((flash_c(q, k, v, pad) - ref)[:, :valid].abs().max()),
        "ref_abs_max": float(ref.abs().max()),
        "math_compiled_us_per_layer": median_us(lambda: [math_c(q, k, v, mask) for _ in range(layers)], layers),
        "flash_varlen_us_per_layer": median_us(lambda: [flash_c(q, k, v, pad) for _ in range(layers)], layers),
    }
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel([backend]):
                got = sdpa(q, kx, vx, sdpa_mask)
                out[f"sdpa_{name}_max_abs_valid_rows"] = float((got - ref)[:, :valid].abs().max())
                calls = lambda: [sdpa(q, kx, vx, sdpa_mask) for _ in range(layers)]  # noqa: E731
                out[f"sdpa_{name}_us_per_layer"] = median_us(calls, layers)
        except RuntimeError as e:  # the backend refuses these inputs
            out[f"sdpa_{name}_error"] = str(e).splitlines()[0][:300]
    print("prefix attention:", json.dumps(out), flush=True)
    return out


def triton_prefix_attention() -> dict[str, Any]:
    from pi05eval.kernels.prefix_attention_triton import PrefixAttentionScratch
    from pi05eval.kernels.prefix_attention_triton import prefix_attention as triton_attention
    from pi05eval.model.attention import apply_rope, rope_cos_sin

    p, valid, heads, hd, layers = 544, 532, 8, 256, 17
    g = torch.Generator(device=DEV).manual_seed(1)
    qkv = torch.randn(1, p, (heads + 2) * hd, device=DEV, dtype=DT, generator=g)
    q = qkv[..., : heads * hd]  # [1, P, H * hd], row stride (H + 2) hd as in the engine
    k = torch.randn(1, 1, p, hd, device=DEV, dtype=DT, generator=g)
    v = torch.randn(1, 1, p, hd, device=DEV, dtype=DT, generator=g)
    pad = torch.arange(p, device=DEV)[None] < valid  # [1, P]
    mask = pad[:, None, :] & pad[:, :, None]
    cos, sin = rope_cos_sin(torch.cumsum(pad.long(), dim=1) - 1, hd, 10000.0, DT)  # [1, 1, P, hd]

    def rope_math(q, k, v, mask, cos, sin):
        qh = apply_rope(q.view(1, p, heads, hd).transpose(1, 2), cos, sin)
        return attention(qh, k, v, mask, hd**-0.5)

    math_c = torch.compile(rope_math, fullgraph=True)
    ref = rope_math(q, k, v, mask, cos, sin)
    out: dict[str, Any] = {
        "rope_math_compiled_us_per_layer": median_us(
            lambda: [math_c(q, k, v, mask, cos, sin) for _ in range(layers)], layers
        ),
        "configs": {},
    }
    for bn, warps, stages, split in itertools.product((32, 64), (4, 8), (2, 3), (1, 2, 3, 4)):
        kw = {"block_m": 64, "block_n": bn, "warps": warps, "stages": stages, "split": split}
        name = f"bn{bn}_w{warps}_s{stages}_split{split}"
        scratch = PrefixAttentionScratch(1, p, heads, hd, 64, split, q.device)

        def run(kw=kw, sc=scratch):
            return triton_attention(q, k, v, pad, hd**-0.5, cos, sin, **kw, scratch=sc)

        try:
            err = float((run() - ref)[:, :valid].abs().max())
            us = median_us(lambda run=run: [run() for _ in range(layers)], layers)
        except Exception as e:  # out of shared memory or registers: record it, go on
            out["configs"][name] = {"error": str(e).splitlines()[0][:200]}
            continue
        out["configs"][name] = {"us": round(us, 2), "max_abs_valid_rows": err}
        print(name, out["configs"][name], flush=True)
    timed = {n: c["us"] for n, c in out["configs"].items() if "us" in c}
    best = min(timed, key=timed.get) if timed else None
    out["best"] = best
    out["ref_abs_max"] = float(ref.abs().max())
    log = (out["rope_math_compiled_us_per_layer"], best, out["configs"].get(best))
    print("triton prefix attention:", *log, flush=True)
    return out


def triton_softmax() -> dict[str, Any]:
    from pi05eval.kernels.softmax_triton import masked_softmax

    p, valid, heads, layers = 544, 532, 8, 17
    g = torch.Generator(device=DEV).manual_seed(2)
    logits = torch.randn(1, 1, heads * p, p, device=DEV, dtype=DT, generator=g) * 16
    pad = torch.arange(p, device=DEV)[None] < valid  # [1, P]

    def eager(x, pad):  # as `attention`: scale in bf16, mask, fp32 softmax, bf16
        mask = (pad[:, None, :] & pad[:, :, None])[:, None]  # [1, 1, P, P]
        y = (x * 0.0625).view(1, heads, p, p).float()
        return torch.softmax(torch.where(mask, y, -2.3819763e38), dim=-1).to(DT).view(x.shape)

    ref = eager(logits, pad)
    compiled = torch.compile(eager, fullgraph=True)
    out: dict[str, Any] = {
        "inductor_us": median_us(lambda: [compiled(logits, pad) for _ in range(layers)], layers),
        "configs": {},
    }
    for block_r in (1, 2, 4, 8):
        for warps in (2, 4, 8):
            kw = {"block_r": block_r, "warps": warps}
            err = float((masked_softmax(logits, pad, 0.0625, **kw).float() - ref.float()).abs().max())
            us = median_us(lambda kw=kw: [masked_softmax(logits, pad, 0.0625, **kw) for _ in range(layers)], layers)
            out["configs"][f"r{block_r}_w{warps}"] = {"us": round(us, 2), "max_abs": err}
    print("softmax:", json.dumps(out), flush=True)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="write the JSON result here")
    p.add_argument("--attention-only", action="store_true", help="skip the GEMM shapes")
    p.add_argument("--triton", action="store_true", help="only the Triton prefix attention against the engine's path")
    p.add_argument("--softmax", action="store_true", help="only the Triton masked softmax against inductor's")
    args = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    res: dict[str, Any] = {"env": environment()}
    if args.softmax:
        res["softmax"] = triton_softmax()
    elif args.triton:
        res["triton_prefix_attention"] = triton_prefix_attention()
    else:
        if not args.attention_only:
            res["gemms"] = gemms()
        res["prefix_attention"] = prefix_attention()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
