"""Precision plans: one numeric format per model component, validated before anything is loaded.

A plan names, for each component of Pi0.5, the format its linear layers (GEMMs) run in:

    vision       SigLIP So400m and the projector into the LLM width
    prefix.attn  Q/K/V/O projections of the PaliGemma LLM (the prefill)
    prefix.mlp   gate/up/down projections of the PaliGemma LLM
    expert.attn  Q/K/V/O projections of the action expert (run once per denoise step)
    expert.mlp   gate/up/down projections of the action expert
    heads        action in/out projections and the time MLP
    kv_cache     storage of the prefix K/V the expert reads

Norms, softmax, RoPE and the residual stream stay in the plan's `compute` dtype (bf16 or fp32). Formats:
`fp32`, `bf16`, `fp16` (the GEMM in that float type), `fp8` (E4M3 weights per output channel, static per-tensor
activation scale from calibration), `int8` (W8A8 SmoothQuant), `w4a16` (INT4 weights in groups of 128, bf16
activations), `nvfp4` (E2M1 in blocks of 16 with FP8 block scales; Blackwell only).

`simulate=true` runs ModelOpt's fake quantization instead of real low-precision kernels: for accuracy studies on
any hardware; its latency measures nothing and the run's summary says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from pi05eval.errors import SetupError

COMPONENTS: tuple[str, ...] = ("vision", "prefix.attn", "prefix.mlp", "expert.attn", "expert.mlp", "heads", "kv_cache")
FLOAT_FORMATS: tuple[str, ...] = ("fp32", "bf16", "fp16")
QUANT_FORMATS: tuple[str, ...] = ("fp8", "int8", "w4a16", "nvfp4")
FORMATS: tuple[str, ...] = FLOAT_FORMATS + QUANT_FORMATS
KV_CACHE_FORMATS: tuple[str, ...] = ("fp32", "bf16", "fp16", "fp8")
COMPUTE_DTYPES: tuple[str, ...] = ("bf16", "fp32")
CALIBRATION_SOURCES: tuple[str, ...] = ("initial_states",)

# (major, minor) CUDA compute capability a format's real kernels need
MIN_CAPABILITY: dict[str, tuple[int, int]] = {"fp8": (8, 9), "int8": (7, 5), "nvfp4": (10, 0)}


class PrecisionError(SetupError, ValueError):
    """A precision plan that is malformed or that this engine / hardware cannot run."""


@dataclass(frozen=True)
class CalibrationConfig:
    """Where the calibration observations come from (LIBERO initial states of the run's suite, cached on disk)."""

    source: str = "initial_states"
    num_obs: int = 32  # observations fed to ModelOpt's forward loop
    holdout: int = 8  # further observations kept out of calibration, for the fidelity ledger
    num_steps_wait: int = 10  # no-op steps before recording (objects settle, as in openpi's protocol)
    path: str | None = None  # an explicit file; None: $PI05EVAL_CACHE/calibration/<suite>-<hash>.npz
    suite: Any = None  # the run's suite config (filled by the policy config: ${suite})

    def __post_init__(self) -> None:
        if self.source not in CALIBRATION_SOURCES:
            raise PrecisionError(
                f"unknown calibration.source {self.source!r}; choices: {', '.join(CALIBRATION_SOURCES)}"
            )
        if self.num_obs < 1 or self.holdout < 0 or self.num_steps_wait < 1:
            raise PrecisionError(
                "calibration needs num_obs ≥ 1, holdout ≥ 0 and num_steps_wait ≥ 1, got "
                f"{self.num_obs}, {self.holdout}, {self.num_steps_wait}"
            )


@dataclass(frozen=True)
class PrecisionPlan:
    """Per-component formats (see module docstring); build with `PrecisionPlan.parse`."""

    compute: str = "bf16"
    formats: Mapping[str, str] = field(default_factory=dict)  # every component → format
    simulate: bool = False
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def __post_init__(self) -> None:
        if self.compute not in COMPUTE_DTYPES:
            raise PrecisionError(f"unknown precision.compute {self.compute!r}; choices: {', '.join(COMPUTE_DTYPES)}")
        full = {c: default_format(c, self.compute) for c in COMPONENTS}
        for comp, fmt in self.formats.items():
            if comp not in full:
                raise PrecisionError(f"unknown precision component {comp!r}; components: {', '.join(COMPONENTS)}")
            choices = KV_CACHE_FORMATS if comp == "kv_cache" else FORMATS
            if fmt not in choices:
                raise PrecisionError(f"unknown format {fmt!r} for precision.{comp}; choices: {', '.join(choices)}")
            full[comp] = fmt
        object.__setattr__(self, "formats", full)

    # ------------------------------------------------------------------------------------------------ building

    @classmethod
    def parse(cls, spec: str | Mapping[str, Any] | PrecisionPlan | None) -> PrecisionPlan:
        """`"bf16"` / `"fp32"` (uniform), or a mapping as in `conf/policy/precision/*.yaml`:
        {compute, vision, prefix: {attn, mlp}, expert: {attn, mlp}, heads, kv_cache, simulate, calibration}.
        Dotted keys ("prefix.mlp") work too."""
        if spec is None:
            return cls()
        if isinstance(spec, PrecisionPlan):
            return spec
        if isinstance(spec, str):
            if spec not in COMPUTE_DTYPES:
                raise PrecisionError(
                    f"precision {spec!r} as a single word must be one of {', '.join(COMPUTE_DTYPES)}; "
                    f"for a mix give per-component formats (components: {', '.join(COMPONENTS)})"
                )
            return cls(compute=spec)
        spec = dict(spec)
        compute = spec.pop("compute", "bf16")
        simulate = bool(spec.pop("simulate", False))
        calib = spec.pop("calibration", None) or {}
        formats: dict[str, str] = {}
        for key, value in spec.items():
            if isinstance(value, Mapping):
                for sub, fmt in value.items():
                    formats[f"{key}.{sub}"] = fmt
            else:
                formats[key] = value
        known_calib = set(CalibrationConfig.__dataclass_fields__)
        if unknown := set(calib) - known_calib:
            raise PrecisionError(f"unknown calibration keys {sorted(unknown)}; keys: {sorted(known_calib)}")
        return cls(compute, formats, simulate, CalibrationConfig(**calib))

    def with_formats(self, **formats: str) -> PrecisionPlan:
        """A copy with some components changed (keys use `_` for `.`: prefix_mlp="fp8")."""
        merged = dict(self.formats) | {k.replace("_", ".", 1) if k != "kv_cache" else k: v for k, v in formats.items()}
        return replace(self, formats=merged)

    # ------------------------------------------------------------------------------------------------ queries

    @property
    def quantized(self) -> dict[str, str]:
        """Components in a quantized format (what calibration and the fidelity ledger are about)."""
        return {c: f for c, f in self.formats.items() if f in QUANT_FORMATS}

    @property
    def is_exact(self) -> bool:
        """True when every component runs in the compute dtype (heads may stay fp32, as openpi keeps them)."""
        return all(f == default_format(c, self.compute) for c, f in self.formats.items())

    @property
    def label(self) -> str:
        """`bf16`, or `bf16+prefix.mlp=fp8,expert.attn=fp8` (components off their default), `+sim` if simulated."""
        diff = [f"{c}={f}" for c, f in self.formats.items() if f != default_format(c, self.compute)]
        return self.compute + ("+" + ",".join(diff) if diff else "") + ("+sim" if self.simulate else "")

    def as_dict(self) -> dict[str, Any]:
        return {"compute": self.compute, **self.formats, "simulate": self.simulate}


def default_format(component: str, compute: str) -> str:
    """openpi's bf16 inference keeps the action / time heads in fp32; everything else in the compute dtype."""
    return "fp32" if component == "heads" else compute


def check_hardware(plan: PrecisionPlan, capability: tuple[int, int] | None) -> None:
    """Fail up front when real kernels of a format need a newer GPU (or any GPU); simulated plans always pass.

    `capability`: the device's CUDA compute capability, or None on a CPU.
    """
    if plan.simulate:
        return
    for comp, fmt in plan.formats.items():
        need = MIN_CAPABILITY.get(fmt)
        if need is None:
            continue
        where = "a CPU" if capability is None else f"a GPU of compute capability {capability[0]}.{capability[1]}"
        if capability is None and fmt in ("fp8", "int8", "w4a16"):
            continue  # torch has CPU kernels for these (slow, but real: tests use them)
        if capability is None or capability < need:
            raise PrecisionError(
                f"precision.{comp}={fmt} needs compute capability ≥ {need[0]}.{need[1]} for real kernels; this is "
                f"{where}. Set policy.precision.simulate=true to study its accuracy with fake quantization "
                "(latency is then meaningless), or pick another format"
            )
