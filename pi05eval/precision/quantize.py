"""Apply a `PrecisionPlan` to a loaded `Pi05Model`: float casts, ModelOpt calibration, real or simulated kernels.

* float formats (fp32/bf16/fp16) swap the component's linears for `CastLinear`s;
* quantized formats are calibrated with NVIDIA ModelOpt (`mtq.quantize(model, cfg, forward_loop)`) on recorded
  observations. With `simulate=false` the calibrated ranges (weight amax per channel / block, static input amax,
  SmoothQuant factors) become real kernels (`precision/linear.py`) and ModelOpt's quantizers are dropped; with
  `simulate=true` the fake-quant model itself runs (accuracy only). For `engine=tensorrt` the fake-quant model is
  what gets exported (its Q/DQ nodes become TensorRT's low-precision layers).

ModelOpt is imported lazily: a plan that needs it names the extra to install.
"""

from __future__ import annotations

import copy
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pi05eval.errors import SetupError
from pi05eval.precision import scales
from pi05eval.precision.linear import CastLinear, Nvfp4SimLinear, int4_group
from pi05eval.precision.plan import QUANT_FORMATS, PrecisionError, PrecisionPlan, default_format

log = logging.getLogger(__name__)

# component -> pattern over `Pi05Model.named_modules()` names of its nn.Linear layers
COMPONENT_PATTERNS: dict[str, str] = {
    "vision": r"^(vision\.|projector$)",
    "prefix.attn": r"^llm\.layers\.\d+\.attn\.",
    "prefix.mlp": r"^llm\.layers\.\d+\.mlp\.",
    "expert.attn": r"^expert\.layers\.\d+\.attn\.",
    "expert.mlp": r"^expert\.layers\.\d+\.mlp\.",
    "heads": r"^(action_in|action_out|time_in|time_out)$|^expert\.(layers\.\d+\.)?(attn_norm|mlp_norm|norm)\.dense$",
}
FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# formats each engine runs with real kernels (anything else needs simulate=true)
REAL_FORMATS: dict[str, tuple[str, ...]] = {
    "eager": ("fp32", "bf16", "fp16", "fp8", "int8", "w4a16"),
    "compile": ("fp32", "bf16", "fp16", "fp8", "int8", "w4a16"),
    "tensorrt": ("fp32", "bf16", "fp16", "fp8", "int8", "w4a16", "nvfp4"),
}
WHY_NOT = {"nvfp4": "torch has no NVFP4 GEMM for it (TensorRT on a Blackwell GPU has)"}


class MissingQuantBackend(SetupError, ImportError):
    pass


def require_modelopt() -> Any:
    try:
        import modelopt.torch.quantization as mtq
    except ImportError as e:
        raise MissingQuantBackend(
            f"quantized precision formats ({', '.join(QUANT_FORMATS)}) are calibrated with NVIDIA ModelOpt, which is "
            f'not installed ({e}): pip install "pi05eval[quant]"'
        ) from e
    return mtq


def component_linears(model: nn.Module) -> dict[str, list[str]]:
    """component -> names of its linear layers (every nn.Linear of the model belongs to exactly one component)."""
    out: dict[str, list[str]] = {c: [] for c in COMPONENT_PATTERNS}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        owners = [c for c, pat in COMPONENT_PATTERNS.items() if re.search(pat, name)]
        if len(owners) != 1:
            raise RuntimeError(f"linear layer {name!r} matches components {owners}: fix COMPONENT_PATTERNS")
        out[owners[0]].append(name)
    return out


def check_engine(plan: PrecisionPlan, engine: str) -> None:
    """Fail up front when the engine cannot run a component's format (say which and why)."""
    if plan.simulate and engine == "tensorrt":
        raise PrecisionError(
            "precision.simulate=true runs ModelOpt fake quantization in PyTorch; engine=tensorrt builds real "
            "low-precision engines. Use engine=eager or compile to simulate, or simulate=false"
        )
    if plan.formats["kv_cache"] != plan.compute:
        raise PrecisionError(
            f"precision.kv_cache={plan.formats['kv_cache']} is not implemented: the K/V cache is kept in the compute "
            f"dtype ({plan.compute}); at batch 1 it is ~1 MB per layer, so a smaller cache buys no speed"
        )
    if "int8" in plan.quantized.values() and len(set(plan.quantized.values())) > 1:
        raise PrecisionError(
            f"int8 (SmoothQuant) calibrates with its own algorithm and cannot share a plan with other quantized "
            f"formats: {plan.quantized}"
        )
    if plan.simulate:
        return
    real = REAL_FORMATS.get(engine, REAL_FORMATS["eager"])
    for comp, fmt in plan.formats.items():
        if comp != "kv_cache" and fmt not in real:
            raise PrecisionError(
                f"engine={engine} cannot run precision.{comp}={fmt}: {WHY_NOT.get(fmt, 'not supported')}. "
                "Set policy.precision.simulate=true for an accuracy study with fake quantization"
            )


# ------------------------------------------------------------------------------------------------ ModelOpt recipes


def _quantizer_cfg(fmt: str, in_features: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(weight quantizer, input quantizer or None = disabled) for a format, as ModelOpt attributes."""
    if fmt == "fp8":
        return {"num_bits": (4, 3), "axis": 0}, {"num_bits": (4, 3), "axis": None}
    if fmt == "int8":
        return {"num_bits": 8, "axis": 0}, {"num_bits": 8, "axis": None}
    if fmt == "w4a16":
        return {"num_bits": 4, "block_sizes": {-1: int4_group(in_features), "type": "static"}, "enable": True}, None
    if fmt == "nvfp4":
        block = {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}
        return {"num_bits": (2, 1), "block_sizes": block, "axis": None}, {
            "num_bits": (2, 1),
            "block_sizes": block,
            "axis": None,
        }
    raise PrecisionError(f"no ModelOpt recipe for {fmt!r}")


def modelopt_config(model: nn.Module, plan: PrecisionPlan, only: Iterable[str] | None = None) -> dict[str, Any]:
    """A ModelOpt config quantizing exactly the linears of the plan's quantized components (or of `only`)."""
    comps = set(only) if only is not None else set(plan.quantized)
    names = component_linears(model)
    quant_cfg: dict[str, Any] = {"*": {"enable": False}}
    for comp in sorted(comps):
        for name in names[comp]:
            w_cfg, a_cfg = _quantizer_cfg(plan.formats[comp], model.get_submodule(name).in_features)
            quant_cfg[f"{name}.weight_quantizer"] = {**w_cfg, "enable": True}
            quant_cfg[f"{name}.input_quantizer"] = {**a_cfg, "enable": True} if a_cfg else {"enable": False}
    algorithm = "smoothquant" if "int8" in {plan.formats[c] for c in comps} else "max"
    return {"quant_cfg": quant_cfg, "algorithm": algorithm}


# ------------------------------------------------------------------------------------------------ applying


@dataclass
class QuantizedModel:
    """The result of `apply_plan`: the model to run and what was done to it."""

    model: nn.Module
    plan: PrecisionPlan
    simulated: bool = False
    fake_quant: nn.Module | None = None  # the ModelOpt fake-quant model (simulation / TensorRT export)
    replaced: dict[str, str] = field(default_factory=dict)  # linear name -> module kind it became
    scales: dict[str, scales.LayerScale] | None = None  # calibrated ranges of the real layers
    scales_loaded: bool = False  # from the scales cache (no calibration ran)
    originals: dict[str, nn.Module] | None = None  # float layers the real ones replaced (keep_originals)

    def describe(self) -> dict[str, Any]:
        return {
            "plan": self.plan.as_dict(),
            "label": self.plan.label,
            "simulated": self.simulated,
            "layers": dict(Counter(self.replaced.values())),  # module kind -> count
            "scales_loaded": self.scales_loaded,
        }


def _on_cuda(model: nn.Module) -> bool:
    return next(model.parameters()).is_cuda


def apply_float_formats(model: nn.Module, plan: PrecisionPlan) -> dict[str, str]:
    """Components in a float format other than the model's own: their linears become `CastLinear`s."""
    replaced = {}
    names = component_linears(model)
    for comp, fmt in plan.formats.items():
        if comp == "kv_cache" or fmt not in FLOAT_DTYPES or fmt == default_format(comp, plan.compute):
            continue
        for name in names[comp]:
            lin = model.get_submodule(name)
            scales.set_module(model, name, CastLinear(lin.weight, lin.bias, FLOAT_DTYPES[fmt]))
            replaced[name] = f"cast_{fmt}"
    return replaced


def apply_plan(
    model: nn.Module,
    plan: PrecisionPlan,
    forward_loop: Callable[[nn.Module], None] | None,
    *,
    fake_quant_only: bool = False,
    scales_cache: Path | None = None,
    keep_originals: bool = False,
) -> QuantizedModel:
    """Apply the plan in place and return what to run. `forward_loop(model)` runs the calibration observations.

    `fake_quant_only`: leave ModelOpt's quantizers in the returned model (simulation, or TensorRT export).
    `scales_cache`: where the calibrated ranges are saved, and loaded from instead of calibrating again.
    `keep_originals`: keep the float layers the real ones replaced (per-component fidelity swaps them back).
    """
    replaced = apply_float_formats(model, plan)
    if not plan.quantized:
        return QuantizedModel(model, plan, replaced=replaced)
    names = component_linears(model)
    if plan.simulate and "nvfp4" in plan.quantized.values() and not _on_cuda(model):
        # ModelOpt's NVFP4 fake quantization needs CUDA: on other hosts the same rounding in plain torch
        log.warning("simulating NVFP4 without CUDA: pi05eval's own NVFP4 rounding instead of ModelOpt's")
        for comp in [c for c, f in plan.quantized.items() if f == "nvfp4"]:
            for name in names[comp]:
                lin = model.get_submodule(name)
                scales.set_module(model, name, Nvfp4SimLinear(lin.weight, lin.bias))
                replaced[name] = "sim_nvfp4"
        rest = {c: f for c, f in plan.quantized.items() if f != "nvfp4"}
        if not rest:
            return QuantizedModel(model, plan, simulated=True, replaced=replaced)
        plan = replace(plan, formats={**plan.formats, **{c: plan.compute for c in plan.quantized if c not in rest}})
    if plan.simulate or fake_quant_only:
        if forward_loop is None:
            raise PrecisionError(f"quantized components {plan.quantized} need calibration observations")
        require_modelopt().quantize(model, modelopt_config(model, plan), forward_loop)
        for comp in plan.quantized:
            replaced |= {n: f"modelopt_{plan.formats[comp]}" for n in names[comp]}
        return QuantizedModel(model, plan, simulated=plan.simulate, fake_quant=model, replaced=replaced)
    layer_scales = scales.load(scales_cache) if scales_cache is not None else None
    loaded = layer_scales is not None
    if layer_scales is None:
        if forward_loop is None:
            raise PrecisionError(f"quantized components {plan.quantized} need calibration observations")
        calibrated = copy.deepcopy(model)
        require_modelopt().quantize(calibrated, modelopt_config(model, plan), forward_loop)
        layer_scales = scales.extract(calibrated, names, plan)
        del calibrated
        if scales_cache is not None:
            scales.save(scales_cache, layer_scales, {"plan": plan.label})
    originals = scales.realize(model, layer_scales)
    replaced |= {n: s.fmt for n, s in layer_scales.items()}
    log.info(
        "precision %s: %d linear layers replaced by real kernels (scales %s)",
        plan.label,
        len(layer_scales),
        f"loaded from {scales_cache}" if loaded else "calibrated now",
    )
    return QuantizedModel(
        model,
        plan,
        replaced=replaced,
        scales=layer_scales,
        scales_loaded=loaded,
        originals=originals if keep_originals else None,
    )


def layers_of(names: Iterable[str], component: str) -> set[str]:
    """The names among `names` that belong to `component`."""
    return {n for n in names if re.search(COMPONENT_PATTERNS[component], n)}


def enable_only(fake_quant: nn.Module, plan: PrecisionPlan, component: str | None) -> None:
    """Switch the ModelOpt quantizers of one component on and all others off (None: all of the plan's on)."""
    names = component_linears(fake_quant)
    for comp in plan.quantized:
        on = component is None or comp == component
        for name in names[comp]:
            mod = fake_quant.get_submodule(name)
            for q in (mod.weight_quantizer, mod.input_quantizer):
                if not hasattr(q, "_pi05_enabled"):  # as calibration left it (w4a16 has no input quantizer)
                    q._pi05_enabled = q.is_enabled
                if on and q._pi05_enabled:
                    q.enable()
                else:
                    q.disable()
