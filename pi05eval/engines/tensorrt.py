"""`engine=tensorrt`: the fast path's stages exported with `torch.export` and built into TensorRT engines.

What runs where. Per prompt-length bucket and count of kept image slots, three programs come from `FastPi05`:
`vision` (images -> image tokens), `prefill` (-> K/V cache, key mask) and `denoise` = ONE Euler step (x_t, the
step's adaRMS row, K/V, key mask -> x_{t+dt}), called `num_steps` times with the rows of a table computed at build
time (a fixed schedule: the time MLP never runs in TensorRT). One step rather than the unrolled loop keeps each
weight once per engine (quantized weights would be folded once per step) and the build short. Export runs on the
model's device, under ModelOpt's `export_torch_mode()` when the model has ModelOpt quantizers: fake-quant layers
then trace to `tensorrt.quantize_op` (quantize + dequantize) nodes, which Torch-TensorRT turns into TensorRT Q/DQ
layers that the builder fuses into FP8 / INT8 GEMMs. Each stage is built by `torch_tensorrt.dynamo.compile`
(static shapes), saved by `torch_tensorrt.save(..., output_format="exported_program")` and reloaded by
`torch.export.load(path).module()`; the file name hashes model config, weights, precision label, steps, shortcuts,
batch, bucket, image slots, stage, build options, GPU and torch / torch_tensorrt versions. A call copies host
inputs to the GPU and runs the stages back to back with CUDA events between them (`stage_ms()`); no CUDA-graph
capture of the whole call (the compile engine has one). Every bucket's prefill / denoise engine holds its own copy
of the LLM / expert weights (vision is shared across buckets): build only the buckets the tasks need.

Quantized models: ModelOpt's `QuantLinear` quantizes only when the module itself is called, so the fused Q/K/V and
gate/up GEMMs (`fuse_qkv`, `fuse_gate_up`, which read the weights directly) are off for them (TensorRT fuses GEMMs
itself); `static_kv` (in-place writes into an input) is always off.

Tested here (CPU, torch 2.13, ModelOpt 0.47; no TensorRT, no GPU): the missing-backend error comes before any
export; every exported program, plain and FP8 fake-quant, reproduces FastPi05's stages (the step program looped
reproduces `FastPi05.denoise`); quantized graphs carry `tensorrt.quantize_op` on both inputs of every quantized
linear; cache keys and compile settings. NOT tested: everything from `torch_tensorrt.dynamo.compile` on — the
TensorRT build, converter coverage of these graphs, FP8 / INT8 kernel selection, save / load, accuracy and speed.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from pi05eval.engines.bucketed import BucketedEngine
from pi05eval.engines.export import (
    STAGES,
    enabled_precisions_for,
    engine_shortcuts,
    example_inputs,
    export_stages,
    modulation_table,
    quant_formats,
    stage_inputs,
    weights_fingerprint,
)
from pi05eval.engines.fast import FastPi05, Shortcuts
from pi05eval.errors import SetupError
from pi05eval.policy.bundle import cache_root
from pi05eval.precision.plan import MIN_CAPABILITY

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = (32, 64, 128, 200)
# TensorRTOptions fields passed on to torch_tensorrt.dynamo.compile
COMPILE_FIELDS = ("use_explicit_typing", "workspace_size", "optimization_level", "min_block_size")
COMPILE_FIELDS += ("require_full_compilation", "truncate_double")
INSTALL_HINT = (
    'install it with `pip install "pi05eval[tensorrt]"` (NVIDIA GPU, Linux), or use the compile engine instead: '
    "policy=compile_bf16 or policy=compile_fp8"
)


class MissingBackendError(SetupError, RuntimeError):
    """An engine's backend (package or hardware) is not available on this machine."""


def require_tensorrt():
    """Import and return `torch_tensorrt`; a `MissingBackendError` saying what to do when it cannot run here."""
    try:
        import torch_tensorrt
    except (ImportError, OSError) as e:  # OSError: the package is there but libnvinfer is not loadable
        raise MissingBackendError(
            f"engine=tensorrt needs torch-tensorrt, which cannot be imported ({e}); {INSTALL_HINT}"
        ) from e
    if not torch.cuda.is_available():
        raise MissingBackendError(
            f"engine=tensorrt: TensorRT needs an NVIDIA GPU and CUDA is not available here; {INSTALL_HINT}"
        )
    return torch_tensorrt


def require_cuda_model(model) -> torch.device:
    """The model's device, a CUDA one whose compute capability has kernels for the model's quantized formats."""
    device = model.action_in.weight.device
    if device.type != "cuda":
        raise ValueError(f"engine=tensorrt needs the model on a CUDA device (policy.device=cuda), got {device}")
    check_capability(quant_formats(model), torch.cuda.get_device_capability(device))
    return device


def check_capability(formats: Iterable[str], capability: tuple[int, int]) -> None:
    """TensorRT's FP8 kernels need compute capability 8.9 (Ada, Hopper), its NVFP4 ones 10.0 (Blackwell)."""
    for fmt in sorted(formats):
        need = MIN_CAPABILITY.get(fmt)
        if need and tuple(capability) < need:
            raise MissingBackendError(
                f"engine=tensorrt: {fmt} needs a GPU of compute capability >= {need[0]}.{need[1]}, "
                f"this one is {capability[0]}.{capability[1]}"
            )


def default_cache_dir() -> Path:
    return cache_root() / "tensorrt"


@dataclass(frozen=True)
class TensorRTOptions:
    """`policy.engine_options` for engine=tensorrt: bucketing, the cache, and documented Torch-TensorRT settings."""

    buckets: tuple[int, ...] = DEFAULT_BUCKETS  # prompt-length buckets; the model's max_token_len is always added
    cache_dir: str | None = None  # None: $PI05EVAL_CACHE/tensorrt or ~/.cache/pi05eval/tensorrt
    cache: bool = True  # save built stages and load them in later processes
    # --- passed to torch_tensorrt.dynamo.compile
    use_explicit_typing: bool = True  # layer precisions follow the graph's dtypes and Q/DQ nodes (strong typing)
    workspace_size: int = 0  # builder workspace in bytes; 0 = TensorRT's default
    optimization_level: int | None = None  # builder optimization 0-5 (None = TensorRT's default, 3)
    min_block_size: int = 5  # fewest consecutive convertible ops that form a TensorRT block
    require_full_compilation: bool = False  # fail instead of leaving unsupported ops to PyTorch
    truncate_double: bool = True  # float64 -> float32 (TensorRT has no float64)

    @classmethod
    def from_spec(cls, options: Mapping[str, Any]) -> TensorRTOptions:
        """Engine-spec options (values may be strings: `buckets=32/64`, `optimization_level=5`) -> options."""
        from pi05eval.engines import coerce_option

        names = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ValueError(f"unknown tensorrt engine option {unknown[0]!r}; choices: {sorted(names)}")
        return cls(**{key: coerce_option(cls, key, value) for key, value in options.items()})


def compile_settings(enabled_precisions: Iterable[torch.dtype], options: TensorRTOptions) -> dict[str, Any]:
    """Keyword arguments for `torch_tensorrt.dynamo.compile`.

    With explicit typing the graph's dtypes (and its Q/DQ nodes) decide every layer's precision and
    `enabled_precisions` must not be passed; without it TensorRT picks kernels among `enabled_precisions`.
    """
    settings = {k: getattr(options, k) for k in COMPILE_FIELDS}
    if not options.use_explicit_typing:
        settings["enabled_precisions"] = set(enabled_precisions)
    return settings


# ---------------------------------------------------------------------------------------------------- quantizers


def cache_key(
    *,
    model_config: Any,
    precision: str,
    num_steps: int,
    shortcuts: Shortcuts,
    batch: int,
    bucket: int,
    images: int,
    stage: str,
    gpu: str,
    versions: tuple[str, ...],
    options: TensorRTOptions | None = None,
    enabled_precisions: Iterable[torch.dtype] = (),
    weights: str = "",
) -> str:
    """The file name of one built stage (vision ignores the bucket, vision and prefill the steps)."""
    opts = compile_settings((), options or TensorRTOptions())
    if "enabled_precisions" in opts:  # only without explicit typing; sorted: a set's order varies between processes
        opts["enabled_precisions"] = sorted(map(str, enabled_precisions))
    parts = [repr(model_config), precision, num_steps, asdict(shortcuts), batch, bucket, images, stage]
    parts += [gpu, versions, sorted(opts.items()), weights]
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:24]


# ---------------------------------------------------------------------------------------------------- export


def _inputs_keyword(fn) -> str:
    """`arg_inputs` in current Torch-TensorRT releases, `inputs` in older ones."""
    return "arg_inputs" if "arg_inputs" in inspect.signature(fn).parameters else "inputs"


def compile_stage(exported, inputs, enabled_precisions, options: TensorRTOptions, device: torch.device | None = None):
    """Build one exported stage into TensorRT engine(s) with `torch_tensorrt.dynamo.compile` (static shapes)."""
    trt = require_tensorrt()
    settings = compile_settings(enabled_precisions, options)
    if device is not None:
        settings["device"] = device
    return trt.dynamo.compile(exported, **{_inputs_keyword(trt.dynamo.compile): list(inputs)}, **settings)


def save_stage(compiled, path: Path, inputs) -> None:
    """`torch_tensorrt.save` as an ExportedProgram (written to a temporary name, then renamed)."""
    trt = require_tensorrt()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp{path.suffix}")  # torch.export wants files ending in .pt2
    trt.save(compiled, str(tmp), output_format="exported_program", **{_inputs_keyword(trt.save): list(inputs)})
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------- engine


class _Built:
    """The three built stages of one (bucket, kept image slots) shape, called back to back."""

    def __init__(self, stages: dict[str, Any], mods: torch.Tensor, device: torch.device) -> None:
        self.vision, self.prefill, self.step = (stages[s] for s in STAGES)
        self.mods, self.device = mods, device
        self.events = [torch.cuda.Event(enable_timing=True) for _ in range(4)] if device.type == "cuda" else []

    def __call__(self, images, img_mask, tokens, token_mask, noise) -> torch.Tensor:
        images, img_mask, tokens, token_mask, noise = (
            t.to(self.device, non_blocking=True) for t in (images, img_mask, tokens, token_mask, noise)
        )
        self._mark(0)
        img_tokens = self.vision(images)
        self._mark(1)
        ks, vs, key_mask = self.prefill(img_tokens, img_mask, tokens, token_mask)
        self._mark(2)
        x = noise.float()
        for mods in self.mods:
            x = self.step(x, mods, ks, vs, key_mask)
        self._mark(3)
        return x

    def _mark(self, i: int) -> None:
        if self.events:
            self.events[i].record()

    def stage_ms(self) -> dict[str, float]:
        ev = self.events
        if not ev:
            return {}
        return {name: ev[i].elapsed_time(ev[i + 1]) for i, name in enumerate(STAGES)}


class TensorRTEngine(BucketedEngine):
    """Drop-in for `Pi05Model.sample_actions` (fixed num_steps and batch size) running TensorRT engines."""

    name = "tensorrt"

    def __init__(
        self,
        model,
        num_steps: int,
        shortcuts: Shortcuts | None = None,
        options: TensorRTOptions | None = None,
        batch_size: int = 1,
        precision: str = "bf16",
        enabled_precisions: Iterable[torch.dtype] | None = None,
    ) -> None:
        trt = require_tensorrt()  # first: no export or build work on a machine that cannot run TensorRT
        self.device = require_cuda_model(model)
        shortcuts = engine_shortcuts(shortcuts, model)
        self.model, self.batch_size, self.precision = model, batch_size, precision
        self.options = options = options or TensorRTOptions()
        self.enabled_precisions = set(enabled_precisions) if enabled_precisions else enabled_precisions_for(model)
        self.fast = FastPi05(model, num_steps, shortcuts)
        self.mods = modulation_table(self.fast)
        self.buckets = self.bucket_set(options.buckets, model.cfg.max_token_len)
        self.cache_dir = Path(options.cache_dir or default_cache_dir())
        gpu = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else self.device.type
        versions = (torch.__version__, getattr(trt, "__version__", "?"))
        self._key_parts = dict(model_config=model.cfg, precision=precision, num_steps=num_steps, shortcuts=shortcuts)
        self._key_parts.update(batch=batch_size, gpu=gpu, versions=versions, options=options)
        self._key_parts.update(enabled_precisions=self.enabled_precisions, weights=weights_fingerprint(model))
        self.built: dict[tuple[int, tuple[int, ...]], _Built] = {}
        self.stages: dict[Path, Any] = {}  # by cache file: one vision engine serves every bucket
        self.build_s: dict[str, float] = {}
        self.cache_loaded = False
        self.last: _Built | None = None

    def stage_file(self, stage: str, bucket: int, images: int) -> Path:
        steps = self._key_parts["num_steps"] if stage == "denoise" else 0
        bucket = 0 if stage == "vision" else bucket
        key = cache_key(**{**self._key_parts, "num_steps": steps}, bucket=bucket, images=images, stage=stage)
        return self.cache_dir / f"{stage}-{key}.pt2"

    def prepare(self, prompt_lengths: Iterable[int], image_masks: tuple[bool, ...] = (True, True, False)) -> float:
        """Build (or load) every bucket these prompt lengths need; returns the seconds spent."""
        t0 = time.perf_counter()
        keep = self.kept_slots(image_masks)
        for bucket in sorted({self.bucket_for(n) for n in prompt_lengths}):
            self._built(bucket, keep)
        return time.perf_counter() - t0

    def _built(self, bucket: int, keep: tuple[int, ...]) -> _Built:
        if (bucket, keep) in self.built:
            return self.built[(bucket, keep)]
        t0 = time.perf_counter()
        files = {s: self.stage_file(s, bucket, len(keep)) for s in STAGES}
        for f in files.values():
            if f not in self.stages and self.options.cache and f.exists():
                try:
                    self.stages[f] = torch.export.load(str(f)).module()
                except Exception as e:  # a corrupt or incompatible file only costs a rebuild
                    log.warning("ignoring TensorRT cache %s: %s", f, e)
        missing = [s for s, f in files.items() if f not in self.stages]
        self.cache_loaded = not missing and (self.cache_loaded or not self.built)  # every stage so far from disk
        if missing:
            ex = stage_inputs(self.fast, *example_inputs(self.fast, self.batch_size, len(keep), bucket))
            programs = export_stages(self.fast, ex, missing)
            for s in missing:
                compiled = compile_stage(programs[s], ex[s], self.enabled_precisions, self.options, self.device)
                if self.options.cache:
                    save_stage(compiled, files[s], ex[s])
                self.stages[files[s]] = compiled
        built = self.built[(bucket, keep)] = _Built(
            {s: self.stages[f] for s, f in files.items()}, self.mods, self.device
        )
        label = f"bucket{bucket}_img{len(keep)}"
        self.build_s[label] = time.perf_counter() - t0
        log.info("tensorrt %s: %s in %.1fs (%s built)", self.precision, label, self.build_s[label], missing or "none")
        return built

    @torch.no_grad()
    def sample_actions(self, images, image_masks, tokens, token_mask, noise, num_steps: int | None = None):
        """Same contract as `Pi05Model.sample_actions` (host or device inputs; device actions)."""
        bucket, keep, (images, image_masks, tokens, token_mask) = self.route(
            images, image_masks, tokens, token_mask, num_steps
        )
        self.last = self._built(bucket, keep)
        return self.last(images, image_masks, tokens, token_mask, noise)

    def stage_ms(self) -> dict[str, float]:
        """CUDA-event times of the last call; read after its output was synchronized."""
        return self.last.stage_ms() if self.last is not None else {}
