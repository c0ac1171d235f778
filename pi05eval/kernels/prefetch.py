"""L2 prefetch of the next kernels' weights from inside the current kernel (Hopper's bulk L2 prefetch).

The denoise kernels are latency-bound: each streams its weight tile from HBM only after it is launched, so HBM
idles through every epilogue, split-K combine and launch gap. A kernel given a `prefetch` tensor (the weight of a
kernel that runs later) asks L2 to fetch it before doing its own work: each thread of each program issues one
`cp.async.bulk.prefetch.L2` of a contiguous chunk (fire and forget, no registers or shared memory held), so HBM
keeps streaming while the chain of small kernels runs, and the later kernel reads its weights from L2.

Measured on an H200 it loses (benchmarks/README.md, "Bulk L2 prefetch"): even L2-resident weights save only 0.1-0.3 µs
per launch on three of the four GEMM kernels, and issuing the prefetches costs more, so `ExpertKernelConfig.prefetch`
and `att_prefetch` are 0 by default.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_MIN_CHUNK_BYTES = 256  # smallest prefetch one thread issues


@triton.jit
def l2_prefetch(pf_ptr, pf_numel, pf_chunk, ELEM_BYTES: tl.constexpr, THREADS: tl.constexpr):
    """This program's share of pf_ptr[:pf_numel]: one chunk of pf_chunk elements per thread (sm_90+ only).

    pf_chunk * ELEM_BYTES is a multiple of 16 and pf_ptr is 16-byte aligned (the instruction's requirements)."""
    pid = tl.program_id(0) + tl.num_programs(0) * (tl.program_id(1) + tl.num_programs(1) * tl.program_id(2))
    chunk = pid.to(tl.int64) * THREADS + tl.arange(0, THREADS)  # one per thread
    start = chunk * pf_chunk
    nbytes = (tl.minimum(pf_numel - start, pf_chunk) * ELEM_BYTES).to(tl.int32)  # <= 0 past the end: skipped
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r",
        [pf_ptr + start, nbytes],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


def prefetch_args(
    weight: torch.Tensor | None, placeholder: torch.Tensor, programs: int, warps: int, at: int = 0
) -> dict[str, object]:
    """Kernel arguments of `l2_prefetch` spreading `weight` over programs x warps * 32 threads (None: no prefetch,
    `placeholder` fills the pointer argument)."""
    threads = warps * 32
    if weight is None:
        return {"pf_ptr": placeholder, "pf_numel": 0, "pf_chunk": 0, "PREFETCH": False, "PF_ELEM": 1,
                "PF_THREADS": threads, "PF_AT": at}  # fmt: skip
    elem = weight.element_size()
    if not weight.is_contiguous() or weight.data_ptr() % 16 or weight.numel() * elem % 16:
        raise ValueError("prefetch needs a contiguous, 16-byte aligned tensor of a multiple of 16 bytes")
    per_thread = max(triton.cdiv(weight.numel() * elem, programs * threads), _MIN_CHUNK_BYTES)
    chunk_bytes = triton.cdiv(per_thread, 16) * 16
    return {"pf_ptr": weight, "pf_numel": weight.numel(), "pf_chunk": chunk_bytes // elem, "PREFETCH": True,
            "PF_ELEM": elem, "PF_THREADS": threads, "PF_AT": at}  # fmt: skip
