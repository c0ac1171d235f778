"""Calibrated ranges per layer, turned into real low-precision layers and kept on disk beside the engine caches.

ModelOpt's calibration leaves, per quantized linear layer, the activation range (`input_amax`), the weight ranges
(per output channel, or per block for INT4) and, for SmoothQuant, the per-input-channel factor it multiplies
activations by (`pre_quant_scale`; it divides the weight by the same factor). Those numbers are all a real layer
needs, so they are saved as `$PI05EVAL_CACHE/scales/<key>.pt`, keyed by the weights, the plan and the calibration
frames: a second process skips calibration.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pi05eval.engines.export import weights_fingerprint
from pi05eval.policy.bundle import cache_root
from pi05eval.precision.linear import Fp8Linear, Int8Linear, W4A16Linear, int4_group
from pi05eval.precision.plan import PrecisionError, PrecisionPlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerScale:
    fmt: str  # fp8 | int8 | w4a16
    input_amax: float | None  # static activation range (None: weight-only)
    weight_amax: torch.Tensor  # [N, 1] per output channel, or [N, K / group] per INT4 block
    pre_quant_scale: torch.Tensor | None = None  # [K] SmoothQuant activation factor


def default_dir() -> Path:
    return cache_root() / "scales"


def scales_key(model: nn.Module, plan: PrecisionPlan, calibration: dict[str, Any]) -> str:
    parts = [weights_fingerprint(model), plan.compute, sorted(plan.quantized.items()), sorted(calibration.items())]
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:20]


def extract(calibrated: nn.Module, names: dict[str, list[str]], plan: PrecisionPlan) -> dict[str, LayerScale]:
    """Per layer name, the ranges ModelOpt calibrated (layers that saw no calibration input are left out: e.g. the
    last LLM layer's Q/O/MLP, whose outputs no action depends on)."""
    out = {}
    for comp, fmt in plan.quantized.items():
        for name in names[comp]:
            q = calibrated.get_submodule(name)
            iq, wq = q.input_quantizer, q.weight_quantizer
            if iq.is_enabled and iq.amax is None:
                log.debug("%s saw no calibration input: left in %s", name, plan.compute)
                continue
            pqs = getattr(iq, "pre_quant_scale", None)
            out[name] = LayerScale(
                fmt=fmt,
                input_amax=float(iq.amax.float().max()) if iq.is_enabled else None,
                weight_amax=wq.amax.detach().float().cpu(),
                pre_quant_scale=None if pqs is None else pqs.detach().float().cpu(),
            )
    return out


def real_layer(linear: nn.Module, scale: LayerScale) -> nn.Module:
    """The real low-precision layer of a float `nn.Linear` given its calibrated ranges."""
    w, b, dev = linear.weight.detach(), linear.bias, linear.weight.device
    amax = scale.weight_amax.to(dev)
    if scale.fmt == "fp8":
        return Fp8Linear(w, b, scale.input_amax, weight_amax=amax)
    if scale.fmt == "int8":
        pqs = None if scale.pre_quant_scale is None else scale.pre_quant_scale.to(dev)
        smoothed = w if pqs is None else (w.float() / pqs).to(w.dtype)  # ModelOpt divides W by the factor
        return Int8Linear(smoothed, b, scale.input_amax, weight_amax=amax, pre_quant_scale=pqs)
    if scale.fmt == "w4a16":
        return W4A16Linear(w, b, int4_group(w.shape[1]), block_amax=amax)
    raise PrecisionError(f"no real kernel for {scale.fmt!r}")


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def realize(model: nn.Module, scales: dict[str, LayerScale], only: set[str] | None = None) -> dict[str, nn.Module]:
    """Swap float layers for real ones in place; returns the float layers replaced (for `restore`)."""
    originals = {}
    for name, scale in scales.items():
        if only is None or name in only:
            originals[name] = model.get_submodule(name)
            set_module(model, name, real_layer(originals[name], scale))
    return originals


def restore(model: nn.Module, originals: dict[str, nn.Module]) -> None:
    for name, module in originals.items():
        set_module(model, name, module)


def save(path: Path, scales: dict[str, LayerScale], meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "layers": {n: vars(s) for n, s in scales.items()}}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load(path: Path) -> dict[str, LayerScale] | None:
    """The saved scales, or None where the file is absent or unreadable (then calibration runs again)."""
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        return {n: LayerScale(**d) for n, d in payload["layers"].items()}
    except Exception as e:  # a corrupt cache only costs a calibration
        log.warning("ignoring scales cache %s: %s", path, e)
        return None
