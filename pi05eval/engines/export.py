"""`torch.export` of the fast path's stages (vision, prefill, one Euler step), aware of ModelOpt's quantizers.

Used by `engine=tensorrt` (`tensorrt.py`); nothing here needs TensorRT. A model with ModelOpt fake-quant layers is
exported under ModelOpt's `export_torch_mode()`, so its quantized linears trace to `tensorrt.quantize_op`
(quantize + dequantize) nodes.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from pi05eval.engines.fast import FastPi05, Shortcuts

STAGES = ("vision", "prefill", "denoise")
QUANT_FORMATS = {(4, 3): "fp8", (2, 1): "nvfp4", 8: "int8", 4: "int4"}  # ModelOpt num_bits -> format


def quantizers(model: nn.Module) -> list[nn.Module]:
    """The ModelOpt tensor quantizers in `model` (found by class, without importing ModelOpt)."""
    return [
        m for m in model.modules() if type(m).__module__.startswith("modelopt.") and "Quantizer" in type(m).__name__
    ]


def export_context(model: nn.Module) -> contextlib.AbstractContextManager:
    """ModelOpt's `export_torch_mode()` when `model` carries quantizers, else a no-op."""
    if not quantizers(model):
        return contextlib.nullcontext()
    from modelopt.torch.quantization.utils import export_torch_mode

    return export_torch_mode()


def engine_shortcuts(shortcuts: Shortcuts | None, model: nn.Module) -> Shortcuts:
    """No `static_kv` (it writes into an input), no `gelu_epilogue` (a cuBLASLt call) nor `triton_prefix` /
    `triton_softmax` / `triton_geglu` (Triton kernels): none is a TensorRT layer; no GEMM fusion or MLP padding with
    quantizers (the new weights would skip them)."""
    no_trt_layer = {"gelu_epilogue": False, "triton_prefix": False, "triton_softmax": False, "triton_geglu": False}
    shortcuts = replace(shortcuts or Shortcuts(), static_kv=False, **no_trt_layer)
    fused_off = {"fuse_qkv": False, "fuse_gate_up": False, "fuse_vision_qkv": False, "pad_vision_mlp": False}
    return replace(shortcuts, **fused_off) if quantizers(model) else shortcuts


def quant_formats(model: nn.Module) -> set[str]:
    """The formats of the model's enabled quantizers: fp8, nvfp4, int8, int4."""
    bits = [getattr(q, "num_bits", None) for q in quantizers(model) if getattr(q, "is_enabled", True)]
    return {QUANT_FORMATS.get(b, str(b)) for b in bits if b is not None}  # None: a SequentialQuantizer


def enabled_precisions_for(model: nn.Module) -> set[torch.dtype]:
    """The kernel precisions a model needs: fp32, its floating parameter dtypes, FP8 / INT8 from its quantizers."""
    out = {torch.float32} | {p.dtype for p in model.parameters() if p.is_floating_point()}
    formats = quant_formats(model)
    return out | {d for f, d in (("fp8", torch.float8_e4m3fn), ("int8", torch.int8)) if f in formats}


def weights_fingerprint(model: nn.Module) -> str:
    """A hash of every parameter and buffer (name, shape, dtype, sums) and of the quantizers' settings.

    A TensorRT engine embeds its weights, so a cached engine must never serve another checkpoint or calibration.
    """
    h = hashlib.sha256()
    samples = []
    for name, t in model.state_dict().items():
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        flat = t.detach().reshape(-1)
        samples.append(flat[:: max(1, flat.numel() // 1024)].float())  # ~1024 values of each tensor, exactly
        if t.dtype in (torch.float32, torch.bfloat16, torch.float16):
            samples.append(flat.sum(dtype=torch.float64).float().reshape(1))
    if samples:
        h.update(torch.cat(samples).cpu().numpy().tobytes())  # one device -> host copy
    for q in quantizers(model):
        h.update(repr(q).encode())
    return h.hexdigest()[:16]


class _Vision(nn.Module):
    def __init__(self, fast: FastPi05) -> None:
        super().__init__()
        self.fast = fast  # not a submodule: each program holds only the weights it reads (as constants)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fast.vision(images)


class _Prefill(_Vision):
    def forward(self, img_tokens, img_mask, tokens, token_mask):  # type: ignore[override]
        return self.fast.prefill(img_tokens, img_mask, tokens, token_mask)


class _DenoiseStep(_Vision):
    """One Euler step; the action tokens' RoPE follows from the key mask (as in `FastPi05.denoise`)."""

    def forward(self, x, mods, ks, vs, key_mask):  # type: ignore[override]
        m, h_act = self.fast.model, x.shape[1]
        lengths = key_mask[:, 0, : key_mask.shape[-1] - h_act].sum(dim=1)
        positions = lengths[:, None] + torch.arange(h_act, device=x.device)
        cos, sin = m._rope(positions, m.expert.compute_dtype)
        return self.fast.update(x, mods, cos, sin, ks, vs, key_mask)


def modulation_table(fast: FastPi05) -> torch.Tensor:
    """[steps, 2 * depth + 1, 1, 3 * De] fp32: every step's adaRMS (scale, shift, gate), as `fold_time` makes it."""
    if fast.mods is not None:
        return fast.mods
    m, dev = fast.model, fast.model.action_in.weight.device
    with torch.no_grad():
        return torch.stack([m.time_modulations(torch.full((1,), t, device=dev)) for t in fast.times])


def example_inputs(fast: FastPi05, batch: int, images: int, bucket: int) -> tuple[torch.Tensor, ...]:
    """Static-shape inputs of one (bucket, image slots) build: images, img_mask, tokens, token_mask, noise."""
    cfg, dev = fast.cfg, fast.model.action_in.weight.device
    pixels = torch.zeros(batch, images, 3, cfg.image_size, cfg.image_size, device=dev)
    token_mask = (torch.arange(bucket, device=dev) == 0).expand(batch, bucket).contiguous()  # one valid token
    tokens = torch.zeros(batch, bucket, dtype=torch.int64, device=dev)
    noise = torch.zeros(batch, cfg.action_horizon, cfg.action_dim, device=dev)
    return pixels, torch.ones(batch, images, dtype=torch.bool, device=dev), tokens, token_mask, noise


@torch.no_grad()
def stage_inputs(fast: FastPi05, images, img_mask, tokens, token_mask, noise) -> dict[str, tuple[torch.Tensor, ...]]:
    """Each stage's example arguments (already trimmed inputs), computed by running the stages eagerly."""
    img_tokens = fast.vision(images)
    ks, vs, key_mask = fast.prefill(img_tokens, img_mask, tokens, token_mask)
    return {
        "vision": (images,),
        "prefill": (img_tokens, img_mask, tokens, token_mask),
        "denoise": (noise.float(), modulation_table(fast)[0], ks, vs, key_mask),
    }


@torch.no_grad()
def export_stages(
    fast: FastPi05, inputs: Mapping[str, tuple[torch.Tensor, ...]], names: Iterable[str] = STAGES
) -> dict[str, Any]:
    """`torch.export` each stage on its example inputs -> {"vision", "prefill", "denoise"}: ExportedProgram.

    `denoise` is one Euler step. Runs without TensorRT; quantized models export under `export_torch_mode()`.
    """
    modules = {"vision": _Vision, "prefill": _Prefill, "denoise": _DenoiseStep}
    with export_context(fast.model):
        return {s: torch.export.export(modules[s](fast), tuple(inputs[s]), strict=False) for s in names}
