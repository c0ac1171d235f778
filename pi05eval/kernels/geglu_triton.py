"""The prefill's gate|up GEMM with GeGLU in its epilogue, one Triton kernel (`Shortcuts.triton_geglu`).

The engine's default prefill runs gate|up as one cuBLAS GEMM and then a GeGLU pass that reads the [P, 2F] product
back and writes [P, F]. Here the weight rows are pair-interleaved (row 2j = gate j, row 2j + 1 = up j,
`config.interleave_gate_up`), so every output tile holds both halves of its F-columns and the epilogue writes
gelu_tanh(gate) * up itself. Roundings as the PyTorch path: the GEMM's output, the gelu and the product in the
activation dtype (`expert_triton.geglu_rounded`, shared with the denoise kernels).

For 16-bit operands on Hopper the kernel reads them through TMA descriptors, in a persistent loop over the tiles (the
M tiles of one N tile in a row, so each weight tile comes from HBM once); otherwise (fp32, older GPUs, Triton's
interpreter) with pointer loads. `geglu_gemm` is a `torch.library` custom op, so torch.compile and CUDA graphs take
it as one opaque call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pi05eval.kernels.expert_triton import _rnd, geglu_rounded

# Tiles of the TMA kernel: the best of scripts/bench_prefill_geglu.py on an H200 at Pi0.5's prefill shape.
TILES = {"bm": 128, "bn": 256, "bk": 64, "stages": 4, "warps": 8}


@triton.jit
def _geglu_pairs(acc, act: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """acc [BM, BN] fp32 of pair-interleaved columns -> gelu_tanh(gate) * up [BM, BN / 2] in act."""
    gate, up = tl.split(tl.reshape(_rnd(acc, act), [BM, BN // 2, 2]))  # the GEMM's output, rounded
    return geglu_rounded(gate, up, act)


@triton.jit
def geglu_gemm_ptr_kernel(x_ptr, w_ptr, out_ptr, M, K: tl.constexpr, N2: tl.constexpr, BM: tl.constexpr,
                          BN: tl.constexpr, BK: tl.constexpr, NUM_M: tl.constexpr,
                          DOT_PREC: tl.constexpr):  # fmt: skip
    """x [M, K], w [N2, K] (pair-interleaved rows) -> out [M, N2 / 2]; one program per tile."""
    pid_n = tl.program_id(0) // NUM_M
    pid_m = tl.program_id(0) % NUM_M
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], tl.float32)
    for k in range(0, K, BK):
        a = tl.load(x_ptr + rm[:, None] * K + (k + rk)[None, :], mask=rm[:, None] < M, other=0.0)
        b = tl.load(w_ptr + rn[:, None] * K + (k + rk)[None, :])
        acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PREC)
    out = _geglu_pairs(acc, out_ptr.dtype.element_ty, BM, BN)
    cn = pid_n * (BN // 2) + tl.arange(0, BN // 2)
    tl.store(out_ptr + rm[:, None] * (N2 // 2) + cn[None, :], out, mask=rm[:, None] < M)


@triton.jit
def geglu_gemm_tma_kernel(x_desc, w_desc, out_desc, K: tl.constexpr, N2: tl.constexpr, BM: tl.constexpr,
                          BN: tl.constexpr, BK: tl.constexpr, NUM_M: tl.constexpr, STAGES: tl.constexpr,
                          PROGRAMS: tl.constexpr, WS: tl.constexpr = False):  # fmt: skip
    """As `geglu_gemm_ptr_kernel` through TMA descriptors, PROGRAMS persistent programs striding over the tiles (WS:
    Triton's warp specialization of the tile loop)."""
    for tile in tl.range(tl.program_id(0), NUM_M * (N2 // BN), PROGRAMS, flatten=WS, warp_specialize=WS):
        pid_n = tile // NUM_M
        pid_m = tile % NUM_M
        acc = tl.zeros([BM, BN], tl.float32)
        for k in tl.range(0, K, BK, num_stages=STAGES):
            acc = tl.dot(x_desc.load([pid_m * BM, k]), w_desc.load([pid_n * BN, k]).T, acc)
        out_desc.store([pid_m * BM, pid_n * (BN // 2)], _geglu_pairs(acc, out_desc.dtype, BM, BN))


def uses_tma(x: torch.Tensor) -> bool:
    """The TMA kernel (its tiles are sized for 16-bit operands) on Hopper and later; pointer loads otherwise."""
    half = x.dtype in (torch.bfloat16, torch.float16)
    return half and x.is_cuda and torch.cuda.get_device_capability(x.device) >= (9, 0)


def launch_geglu_gemm(x: torch.Tensor, w_pairs: torch.Tensor, out: torch.Tensor) -> None:
    """out [M, F] = gelu_tanh(x @ gate^T) * (x @ up^T) for x [M, K] and w_pairs [2F, K] (pair-interleaved rows)."""
    (m, k), n2 = x.shape, w_pairs.shape[0]
    t = TILES
    bn, bk = min(t["bn"], n2), min(t["bk"], k)
    if x.shape[1] != w_pairs.shape[1] or out.shape != (m, n2 // 2):
        raise ValueError(f"geglu_gemm: x {tuple(x.shape)}, w_pairs {tuple(w_pairs.shape)}, out {tuple(out.shape)}")
    if n2 % bn or k % bk or bn & (bn - 1) or bk & (bk - 1) or bk < 16:
        raise ValueError(f"geglu_gemm: 2F={n2} and K={k} must be multiples of power-of-2 tiles {bn} x {bk} (K >= 16)")
    if uses_tma(x):
        from triton.tools.tensor_descriptor import TensorDescriptor

        bm = t["bm"]
        num_m = triton.cdiv(m, bm)
        programs = min(torch.cuda.get_device_properties(x.device).multi_processor_count, num_m * (n2 // bn))
        geglu_gemm_tma_kernel[(programs,)](
            TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(w_pairs, [bn, bk]),
            TensorDescriptor.from_tensor(out, [bm, bn // 2]), K=k, N2=n2, BM=bm, BN=bn, BK=bk, NUM_M=num_m,
            STAGES=t["stages"], PROGRAMS=programs, num_warps=t["warps"],
        )  # fmt: skip
        return
    bm = max(16, min(64, triton.next_power_of_2(m)))
    num_m = triton.cdiv(m, bm)
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    geglu_gemm_ptr_kernel[(num_m * (n2 // bn),)](
        x, w_pairs, out, m, K=k, N2=n2, BM=bm, BN=bn, BK=bk, NUM_M=num_m, DOT_PREC=prec, num_warps=4, num_stages=2
    )


@torch.library.custom_op("pi05eval::geglu_gemm", mutates_args=())
def geglu_gemm(x: torch.Tensor, w_pairs: torch.Tensor) -> torch.Tensor:
    """x [M, K], w_pairs [2F, K] (row 2j gate j, 2j + 1 up j) -> gelu_tanh(gate) * up [M, F] in x's dtype."""
    x = x.contiguous()
    out = x.new_empty(x.shape[0], w_pairs.shape[0] // 2)
    launch_geglu_gemm(x, w_pairs, out)
    return out


@geglu_gemm.register_fake
def _(x: torch.Tensor, w_pairs: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w_pairs.shape[0] // 2)
