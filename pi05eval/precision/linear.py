"""Real low-precision linear layers (no fake quantization): drop-in replacements for a bias-optional `nn.Linear`.

* `CastLinear`   the GEMM in another float dtype (fp16 / bf16 / fp32), activations cast in and out;
* `Fp8Linear`    E4M3 weights with one scale per output channel, activations quantized with a *static* per-tensor
                 scale from calibration, `torch._scaled_mm` (rowwise scales, fp32 accumulate). The quantize step
                 is a plain pointwise op, so inductor fuses it into the kernel that produces the input;
* `Int8Linear`   W8A8 SmoothQuant: the smoothing factor and the static activation scale in one pointwise op, then
                 `torch._int_mm` (int32 accumulate) and a per-channel rescale epilogue;
* `W4A16Linear`  INT4 weights in groups along K with bf16 activations, torch's tinygemm kernel
                 (`_weight_int4pack_mm`, and its CPU twin).

Each is built from a float weight plus calibrated ranges (`amax`), the numbers ModelOpt's calibration produces, so
the real layer computes what ModelOpt's fake-quant simulates (up to accumulation order). `fuse` joins layers that
read the same input (Q/K/V, gate/up) into one GEMM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0
INT4_GROUP = 128


def int4_group(in_features: int) -> int:
    """The group size along K for INT4 weights: 128, or the largest of 64 / 32 dividing a small layer."""
    for g in (INT4_GROUP, 64, 32):
        if in_features % g == 0:
            return g
    raise ValueError(f"w4a16 needs in_features divisible by 32, got {in_features}")


def _bias(linear: nn.Module) -> torch.Tensor | None:
    b = getattr(linear, "bias", None)
    return None if b is None else b.detach()


class CastLinear(nn.Module):
    """y = linear(x.to(dtype)).to(x.dtype): the GEMM in `dtype` (e.g. fp16 inside a bf16 model)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().to(dtype))  # [N, K]
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)

    @classmethod
    def fuse(cls, parts: list[CastLinear]) -> CastLinear | None:
        if any(p.bias is not None for p in parts) or len({p.weight.dtype for p in parts}) != 1:
            return None
        return cls(torch.cat([p.weight for p in parts]), None, parts[0].weight.dtype)


class Fp8Linear(nn.Module):
    """FP8 E4M3 GEMM with a static activation scale: y = (q(x / s_a) @ q(W / s_w)ᵀ) · s_a · s_w (+ b)."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, input_amax: float | torch.Tensor, weight_amax=None
    ) -> None:
        super().__init__()
        w = weight.detach().float()  # [N, K]
        w_amax = w.abs().amax(dim=1) if weight_amax is None else torch.as_tensor(weight_amax).float().reshape(-1)
        w_scale = (w_amax.to(w.device).clamp_min(1e-12) / FP8_MAX).reshape(-1)  # [N]
        w_q = (w / w_scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        self.register_buffer("weight_t", w_q.t())  # [K, N] column-major, as _scaled_mm wants its second operand
        self.register_buffer("weight_scale", w_scale[None, :].contiguous())  # [1, N] fp32
        a_scale = float(input_amax) / FP8_MAX if float(input_amax) > 0 else 1.0
        self.register_buffer("input_scale", torch.tensor(a_scale, device=w.device))  # [] fp32
        self.register_buffer("bias", _bias_or_none(bias))
        self.out_features, self.in_features = w.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] (bf16/fp32) -> [..., N] in x's dtype."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        x_q = (x2.float() / self.input_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)  # fused by inductor
        scale_a = self.input_scale.expand(x2.shape[0], 1).contiguous()  # [M, 1]: rowwise form of the static scale
        y = torch._scaled_mm(x_q, self.weight_t, scale_a=scale_a, scale_b=self.weight_scale, out_dtype=x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*lead, self.out_features)

    @classmethod
    def fuse(cls, parts: list[Fp8Linear]) -> Fp8Linear:
        """One GEMM for layers sharing an input: weights concatenated, the largest activation scale kept."""
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.register_buffer("weight_t", torch.cat([p.weight_t.t() for p in parts]).t())
        fused.register_buffer("weight_scale", torch.cat([p.weight_scale for p in parts], dim=1))
        # the parts read the same input, so calibration gave them the same range; the max guards against drift
        fused.register_buffer("input_scale", torch.stack([p.input_scale for p in parts]).max())
        biases = [p.bias for p in parts]
        fused.register_buffer("bias", None if all(b is None for b in biases) else torch.cat(biases))
        fused.out_features = sum(p.out_features for p in parts)
        fused.in_features = parts[0].in_features
        return fused


class Int8Linear(nn.Module):
    """W8A8 SmoothQuant: y = (q(x · m / s_a) @ q(W' / s_w)ᵀ) · s_a · s_w (+ b), W' the smoothed weight."""

    MIN_ROWS = 17  # torch._int_mm on CUDA needs more than 16 rows: smaller inputs are zero-padded

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        input_amax: float | torch.Tensor,
        weight_amax=None,
        pre_quant_scale: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        w = weight.detach().float()  # [N, K], already multiplied by the smoothing factors (ModelOpt does that)
        w_amax = w.abs().amax(dim=1) if weight_amax is None else torch.as_tensor(weight_amax).float().reshape(-1)
        w_scale = w_amax.to(w.device).clamp_min(1e-12) / INT8_MAX  # [N]
        w_q = torch.round(w / w_scale[:, None]).clamp(-INT8_MAX - 1, INT8_MAX).to(torch.int8)
        self.register_buffer("weight_t", w_q.t())  # [K, N] column-major int8
        self.register_buffer("weight_scale", w_scale[None, :].contiguous())  # [1, N]
        a_scale = float(input_amax) / INT8_MAX if float(input_amax) > 0 else 1.0
        smooth = torch.ones(w.shape[1]) if pre_quant_scale is None else pre_quant_scale.detach().float().reshape(-1)
        # x · m / s_a as one multiply
        self.register_buffer("input_mult", (smooth.to(w.device) / a_scale)[None, :].contiguous())  # [1, K]
        self.register_buffer("input_scale", torch.tensor(a_scale, device=w.device))
        self.register_buffer("bias", _bias_or_none(bias))
        self.out_features, self.in_features = w.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        m = x2.shape[0]
        x_q = torch.round(x2.float() * self.input_mult).clamp(-INT8_MAX - 1, INT8_MAX).to(torch.int8)
        if x_q.is_cuda and m < self.MIN_ROWS:
            x_q = F.pad(x_q, (0, 0, 0, self.MIN_ROWS - m))
        acc = torch._int_mm(x_q, self.weight_t)[:m]  # [M, N] int32
        y = (acc.float() * (self.input_scale * self.weight_scale)).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*lead, self.out_features)


class W4A16Linear(nn.Module):
    """INT4 weights (symmetric, one scale per group of `group` inputs), bf16 activations, tinygemm kernel."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, group: int | None = None, block_amax=None
    ) -> None:
        super().__init__()
        n, k = weight.shape
        group = group or int4_group(k)
        if k % group or n % 8:
            raise ValueError(f"w4a16 needs in_features % {group} == 0 and out_features % 8 == 0, got [{n}, {k}]")
        w = weight.detach().float().view(n, k // group, group)
        amax = w.abs().amax(-1, keepdim=True) if block_amax is None else block_amax.float().view(n, k // group, 1)
        scale = (amax.to(w.device).clamp_min(1e-12) / 7.0).to(torch.bfloat16)  # [N, K/g, 1]
        q = torch.round(w / scale.float()).clamp(-8, 7).to(torch.int32) + 8  # [N, K/g, g] in [0, 15]
        q = q.view(n, k)
        self.cpu = weight.device.type == "cpu"
        if self.cpu:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 8)
        else:
            u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)  # [N, K/2], two nibbles a byte
            packed = torch.ops.aten._convert_weight_to_int4pack(u8, 8)
        zeros = torch.zeros_like(scale)
        # tinygemm dequantizes (q - 8) · scale + zero, with scales_and_zeros [K/g, N, 2]
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", torch.cat([scale, zeros], -1).transpose(0, 1).contiguous())
        self.register_buffer("bias", _bias_or_none(bias))
        self.group, self.out_features, self.in_features = group, n, k

    def dequantized(self) -> torch.Tensor:
        """The weight this layer multiplies by, [N, K] fp32 (for tests and fidelity)."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16, device=self.packed.device)
        return self._mm(eye).float().t()

    def _mm(self, x2: torch.Tensor) -> torch.Tensor:
        op = torch.ops.aten._weight_int4pack_mm_for_cpu if self.cpu else torch.ops.aten._weight_int4pack_mm
        return op(x2, self.packed, self.group, self.scales_and_zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self._mm(x.reshape(-1, self.in_features).to(torch.bfloat16)).to(x.dtype)  # [M, N]
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*lead, self.out_features)


def _bias_or_none(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.detach().float()


def fuse_linears(parts: list[nn.Module]) -> nn.Module | None:
    """One module computing cat([p(x) for p in parts], -1), or None where the kinds cannot share a GEMM."""
    kinds = {type(p) for p in parts}
    if len(kinds) != 1:
        return None
    kind = kinds.pop()
    if kind is nn.Linear:
        biases = [p.bias for p in parts]
        if any(b is None for b in biases) != all(b is None for b in biases):
            return None
        fused = nn.Linear(parts[0].in_features, sum(p.out_features for p in parts), bias=biases[0] is not None)
        fused = fused.to(device=parts[0].weight.device, dtype=parts[0].weight.dtype)
        fused.weight = nn.Parameter(torch.cat([p.weight for p in parts]), requires_grad=False)
        if biases[0] is not None:
            fused.bias = nn.Parameter(torch.cat(biases), requires_grad=False)
        return fused
    fuse = getattr(kind, "fuse", None)
    return fuse(parts) if fuse is not None else None


E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitudes FP4 E2M1 can hold


def nvfp4_round(x: torch.Tensor, block: int = 16) -> torch.Tensor:
    """NVFP4 fake quantization along the last dim (a multiple of `block`): per block of 16 an E4M3 scale (itself
    relative to one fp32 scale per tensor), values rounded to the nearest E2M1 magnitude. Returns x's dtype."""
    shape = x.shape
    v = x.float().reshape(-1, block)  # [blocks, 16]
    global_scale = v.abs().amax().clamp_min(1e-12) / (6.0 * FP8_MAX)
    block_scale = (v.abs().amax(dim=1, keepdim=True) / 6.0 / global_scale).clamp(max=FP8_MAX)
    block_scale = block_scale.to(torch.float8_e4m3fn).float() * global_scale  # [blocks, 1]
    scaled = (v / block_scale.clamp_min(1e-30)).clamp(-6.0, 6.0)
    grid = torch.tensor(E2M1_GRID, device=x.device)
    idx = (scaled.abs()[..., None] - grid).abs().argmin(dim=-1)
    return (grid[idx] * scaled.sign() * block_scale).reshape(shape).to(x.dtype)


class Nvfp4SimLinear(nn.Module):
    """Simulated NVFP4 W4A4 (weights and activations through `nvfp4_round`) for hosts where ModelOpt's NVFP4
    fake quantization cannot run (it needs CUDA): accuracy only, no speed."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight", nvfp4_round(weight.detach()))  # [N, K]
        self.register_buffer("bias", None if bias is None else bias.detach())
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(nvfp4_round(x), self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
