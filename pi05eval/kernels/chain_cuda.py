"""The four GEMMs of an expert layer as one persistent CUDA launch (`expert_chain.cu`, compiled at run time by NVRTC).

`TritonDenoise` with `ExpertKernelConfig.cuda_chain` runs per Euler step: action_in, the chain's Q/K/V of layer 0,
then per layer the Triton attention and one chain launch (O + gated residual, adaRMS + gate|up + GeGLU, down + gated
residual, the next layer's adaRMS + Q/K/V + RoPE), then step_out: 2 launches per layer instead of 5. Inside a chain
launch the phases are separated by grid barriers (one block per SM, all resident); each block copies its weight tiles
of the coming phases into shared memory by bulk asynchronous copies as soon as a buffer frees, so HBM keeps
streaming through the barriers and epilogues. Launches are programmatic dependent launches.

Weights are re-laid once in MMA fragment order (`fragment_order`, another copy of the expert weights: ~620 MB for
Pi0.5 in bf16). Needs a Hopper GPU (bulk copies, griddepcontrol), bf16 activations and at most 16 action rows (batch
1 at horizon 10). The grid barrier's counters are zero-initialized once and reset by the kernel itself.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("expert_chain.cu")
MAX_ROWS = 16  # one m16n8k16 row tile
SMEM_LIMIT = 227 * 1024  # dynamic shared memory of one block on Hopper (opt-in)
_PDL_ATTRIBUTE = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


def fragment_order(w: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [N/8, K/32, 32, 8]: per tile of 8 rows and 32-wide chunk of K, lane 4 g + t holds the B operands of
    two m16n8k16 MMAs, W[8 tile + g, 32 chunk + 8 q + 2 t + e] at position 2 q + e (q < 4, e < 2)."""
    n, k = w.shape
    if n % 8 or k % 32:
        raise ValueError(f"weight {tuple(w.shape)}: rows must be a multiple of 8 and columns of 32")
    return w.reshape(n // 8, 8, k // 32, 4, 4, 2).permute(0, 2, 1, 4, 3, 5).reshape(n // 8, k // 32, 32, 8)


def tile_range(block: int, tiles: int, blocks: int) -> tuple[int, int]:
    """The 8-row tiles [lo, hi) of a phase that block `block` of `blocks` owns (the kernel's tile_lo / tile_hi)."""
    return block * tiles // blocks, (block + 1) * tiles // blocks


def max_tiles(tiles: int, blocks: int) -> int:
    return max(hi - lo for lo, hi in (tile_range(b, tiles, blocks) for b in range(blocks)))


@dataclass(frozen=True)
class ChainShape:
    """The kernel's compile-time constants: model sizes, rows, blocks and the K splits over the warps."""

    width: int  # D
    mlp: int  # F
    heads: int
    kv_heads: int
    head_dim: int
    rows: int  # M = batch * horizon
    horizon: int
    blocks: int  # one per SM
    warps: int = 8
    splits: tuple[int, int, int, int] = (8, 8, 4, 8)  # K splits of Q/K/V, O, gate|up, down
    switches: tuple[str, ...] = ()  # measurement switches of expert_chain.cu ("NO_SYNC", "PROBE=1", ...)

    @property
    def phases(self) -> dict[str, tuple[int, int, int]]:
        """phase -> (8-row tiles, K, K split)"""
        d, f, hd = self.width, self.mlp, self.head_dim
        n_q, n_qkv = self.heads * hd, (self.heads + 2 * self.kv_heads) * hd
        ks = {"qkv": d, "o": n_q, "gu": d, "down": f}
        tiles = {"qkv": n_qkv // 8, "o": d // 8, "gu": 2 * f // 8, "down": d // 8}
        return {
            k: (tiles[k], ks[k], max(1, min(s, self.warps, ks[k] // 32)))
            for k, s in zip(("qkv", "o", "gu", "down"), self.splits, strict=True)
        }

    def check(self) -> None:
        bad = []
        if not 1 <= self.rows <= MAX_ROWS:
            bad.append(f"{self.rows} action rows (batch x horizon): the kernel takes 1 to {MAX_ROWS}")
        if self.width % 64 or self.mlp % 64 or self.heads * self.head_dim % 64 or self.head_dim % 2:
            bad.append(f"width {self.width}, mlp {self.mlp}, heads x head_dim must be multiples of 64, head_dim even")
        if self.width > 128 * self.warps:
            bad.append(f"width {self.width}: the norm takes 4 columns per thread ({32 * self.warps} threads)")
        threads = 32 * self.warps
        for name, (tiles, _, _) in self.phases.items():
            if 32 * max_tiles(tiles, self.blocks) > threads:
                bad.append(f"{name}: {max_tiles(tiles, self.blocks)} tiles per block need > {threads} threads")
        for name, (_, k, split) in self.phases.items():
            if k % (32 * split) or self.warps % split:
                bad.append(f"{name}: K {k} does not split {split} ways into 32-wide chunks over {self.warps} warps")
        if not bad and self.smem_bytes() > SMEM_LIMIT:
            bad.append(f"{self.smem_bytes()} bytes of shared memory per block (at most {SMEM_LIMIT})")
        if bad:
            raise ValueError("expert chain kernel: " + "; ".join(bad))

    def weight_bytes(self, name: str) -> int:
        """Shared memory of one block's weight tiles of a phase (the most any block owns)."""
        tiles, k, _ = self.phases[name]
        return max_tiles(tiles, self.blocks) * 8 * k * 2

    def smem(self) -> tuple[int, int, int]:
        """Bytes of (slot A: gate|up, then Q/K/V + the staged down input; slot B: O, then down; normalized rows /
        partial sums, also the tail of the staged O input)."""
        ph, m = self.phases, self.rows
        q_act = ph["o"][1]  # the O projection's input width (heads x head_dim)
        slot_a = max(self.weight_bytes("gu"), self.weight_bytes("qkv") + m * self.mlp * 2)
        slot_b = max(self.weight_bytes("o"), self.weight_bytes("down"))
        reds = [s * max_tiles(t, self.blocks) * 32 * 16 for t, _, s in ph.values()]
        o_tail = self.weight_bytes("o") + m * q_act * 2 - slot_b  # the staged O input past slot B
        x = max([m * self.width * 2, *reds, o_tail])
        return slot_a, slot_b, -(-x // 16) * 16

    def defines(self) -> list[str]:
        ph = self.phases
        slot_a, slot_b, x = self.smem()
        consts = {
            "D": self.width, "F": self.mlp, "NQKV": (self.heads + 2 * self.kv_heads) * self.head_dim,
            "NQ": self.heads * self.head_dim, "HD": self.head_dim,
            "ROPE_N": (self.heads + self.kv_heads) * self.head_dim,
            "M": self.rows, "L": self.horizon, "NB": self.blocks, "NW": self.warps,
            "SLOT_A": slot_a, "SLOT_B": slot_b, "X_BYTES": x,
            "STAGE_O": slot_a + self.weight_bytes("o"), "STAGE_D": self.weight_bytes("qkv"),
        }  # fmt: skip
        for name, (tiles, _, split) in ph.items():
            consts[f"S_{name.upper()}"] = split
            consts[f"MAXT_{name.upper()}"] = max_tiles(tiles, self.blocks)
        switches = [f"-DCHAIN_{s}" if "=" in s else f"-DCHAIN_{s}=1" for s in self.switches]
        return [f"-D{k}={v}" for k, v in consts.items()] + switches

    def smem_bytes(self) -> int:
        return sum(self.smem()) + 4 * 16 * self.warps + 16  # + row sums of squares, two mbarriers


def unavailable_reason(device: torch.device) -> str | None:
    """Why the chain kernel cannot run on `device`, or None."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return "it needs a CUDA device"
    if torch.cuda.get_device_capability(device) < (9, 0):
        return "it needs a Hopper or newer GPU (bulk asynchronous copies, programmatic dependent launch)"
    if not hasattr(torch.cuda, "_compile_kernel"):
        return f"torch {torch.__version__} has no NVRTC kernel compiler (torch.cuda._compile_kernel, torch >= 2.8)"
    try:
        torch.cuda._utils._get_gpu_rtc_library()
    except Exception as e:  # the NVRTC library is missing or cannot load
        return f"NVRTC cannot be loaded ({e})"
    return None


class _LaunchAttribute(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int), ("rest", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):
    _fields_ = [
        ("grid", ctypes.c_uint * 3),
        ("block", ctypes.c_uint * 3),
        ("shared_mem", ctypes.c_uint),
        ("stream", ctypes.c_void_p),
        ("attrs", ctypes.POINTER(_LaunchAttribute)),
        ("num_attrs", ctypes.c_uint),
    ]


@functools.lru_cache(maxsize=8)
def _compiled(shape: ChainShape, device_index: int) -> object:
    """The NVRTC-compiled kernel of one shape (a torch.cuda._utils._CudaKernel), shared memory configured."""
    with torch.cuda.device(device_index):
        options = ["-std=c++17", *shape.defines()]
        kernel = torch.cuda._compile_kernel(SOURCE.read_text(), "expert_chain", nvcc_options=options)
        kernel.set_shared_memory_config(shape.smem_bytes())
    return kernel


class ExpertChain:
    """Fragment-ordered expert weights and the compiled kernel for one (model, rows) shape; `launch` runs one step
    of the chain (see the module docstring)."""

    def __init__(
        self, wqkv: list[torch.Tensor], wo: list[torch.Tensor], wgu: list[torch.Tensor], wd: list[torch.Tensor],
        shape: ChainShape, eps: float,
    ) -> None:  # fmt: skip
        shape.check()
        device = wqkv[0].device
        reason = unavailable_reason(device)
        if reason:
            raise RuntimeError(f"the CUDA expert chain (cuda_chain=True) cannot run: {reason}")
        if wqkv[0].dtype != torch.bfloat16:
            raise ValueError(f"the CUDA expert chain needs bf16 weights, not {wqkv[0].dtype}")
        self.shape, self.eps, self.device = shape, eps, device
        with torch.no_grad():  # [depth, tiles, K/32, 32, 8] each
            self.w = {
                k: torch.stack([fragment_order(w) for w in ws]).contiguous()
                for k, ws in (("qkv", wqkv), ("o", wo), ("gu", wgu), ("down", wd))
            }
        # grid barrier (count, generation), then the PROBE switch's clock stamps: 10 per launch
        self.barrier = torch.zeros(2 + 10 * (len(wqkv) + 1), dtype=torch.int32, device=device)
        self.device_index = device.index if device.index is not None else torch.cuda.current_device()
        self.kernel, self.smem_bytes = _compiled(shape, self.device_index), shape.smem_bytes()
        self._libcuda = torch.cuda._utils._get_gpu_runtime_library()
        self._attr = _LaunchAttribute(id=_PDL_ATTRIBUTE, value=1)
        log.info("expert chain: %d blocks x %d warps, %d KB shared memory", shape.blocks, shape.warps,
                 self.smem_bytes // 1024)  # fmt: skip

    def variant(self, **changes: object) -> ExpertChain:
        """A copy with another shape (splits, measurement switches), sharing the weights."""
        other = object.__new__(ExpertChain)
        other.__dict__.update(self.__dict__)
        other.shape = dataclasses.replace(self.shape, **changes)
        other.shape.check()
        other.barrier = torch.zeros_like(self.barrier)
        other.kernel, other.smem_bytes = _compiled(other.shape, self.device_index), other.shape.smem_bytes()
        return other

    def launch(
        self, layer: int, qkv_layer: int, mods: torch.Tensor, h: torch.Tensor, att: torch.Tensor, act: torch.Tensor,
        qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    ) -> None:  # fmt: skip
        """O, gate|up and down of `layer` (< 0: none), then Q/K/V of `qkv_layer` (< 0: none).

        mods fp32 [2 depth + 1, 3 D] (one step's adaRMS tables, contiguous); h [M, D], att [M, H hd], act [M, F],
        qkv [M, (H + 2 KV) hd] bf16 contiguous; cos / sin [B, 1, horizon, hd] contiguous in the last dimension.
        """
        s = self.shape
        ptrs = [self.w["qkv"], self.w["o"], self.w["gu"], self.w["down"], mods, h, att, act, qkv, cos, sin]
        args: list[ctypes._SimpleCData] = [ctypes.c_void_p(t.data_ptr()) for t in ptrs]
        args += [ctypes.c_int(cos.stride(0)), ctypes.c_int(cos.stride(2)), ctypes.c_void_p(self.barrier.data_ptr())]
        args += [ctypes.c_int(layer), ctypes.c_int(qkv_layer), ctypes.c_float(self.eps)]
        params = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.byref(a), ctypes.c_void_p) for a in args])
        stream = torch.cuda.current_stream(self.device)
        cfg = _LaunchConfig(
            grid=(ctypes.c_uint * 3)(s.blocks, 1, 1), block=(ctypes.c_uint * 3)(32 * s.warps, 1, 1),
            shared_mem=self.smem_bytes, stream=ctypes.c_void_p(stream.cuda_stream),
            attrs=ctypes.pointer(self._attr), num_attrs=1,
        )  # fmt: skip
        err = self._libcuda.cuLaunchKernelEx(ctypes.byref(cfg), self.kernel.func, params, None)
        if err:
            raise RuntimeError(f"cuLaunchKernelEx of the expert chain failed: CUDA error {err}")
