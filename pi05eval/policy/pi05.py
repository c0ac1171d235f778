"""The Pi0.5 policy: LIBERO observation → transforms → `Pi05Model.sample_actions` → unnormalized [H, 7] actions.

`build_pi05_policy` is what the Hydra policy configs instantiate (``_target_``): it resolves the bundle (all checks
before any simulation), loads the model in the requested precision and composes the transforms of SPEC-pi05.md §7.
Noise comes from a seeded CPU `torch.Generator` per policy (same noise on CPU and GPU), so runs are reproducible.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pi05eval.model.weights import load_pi05
from pi05eval.policy.base import ActionChunk, Observation, TaskInfo
from pi05eval.policy.bundle import DEFAULT_ASSET_ID, BundleError, resolve_bundle
from pi05eval.policy.tokenizer import PROMPT_FORMATS, PromptFormat, PromptTokenizer
from pi05eval.policy.transforms import (
    IMAGE_KEYS,
    IMAGE_SIZE,
    NORM_MODES,
    Compose,
    ImagesToFloat,
    LiberoInputs,
    LiberoOutputs,
    Normalize,
    NormMode,
    NormStats,
    PadStatesAndActions,
    TokenizePrompt,
    ToTensors,
    Unnormalize,
)

logger = logging.getLogger(__name__)

ENGINES: tuple[str, ...] = ("eager", "compile", "tensorrt")  # pi05eval/engines/
LIBERO_STATE_DIM = 8


class Pi05Policy:
    """`Policy` around a loaded `Pi05Model`; stateless between calls apart from the noise generator."""

    needs_privileged = False

    def __init__(
        self,
        name: str,
        model: torch.nn.Module,
        tokenizer: PromptTokenizer,
        norm_stats: Mapping[str, NormStats],
        *,
        action_horizon: int,
        action_dim: int = 32,
        num_steps: int = 10,
        norm: NormMode = "quantile",
        device: str | torch.device = "cpu",
        seed: int = 0,
        engine: Any = None,
    ) -> None:
        """`engine`: an object with the `pi05eval.engines` contract; None runs `model.sample_actions` directly."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be ≥ 1, got {num_steps}")
        if tokenizer.prompt_format == "pi05" and "state" not in norm_stats:
            raise BundleError("prompt_format 'pi05' puts the normalized state into the prompt: no 'state' norm stats")
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.uses_cuda = self.device.type == "cuda"
        self.num_steps = num_steps
        self.action_horizon = action_horizon
        self.action_dim = action_dim
        self.seed = seed
        self.norm_stats = dict(norm_stats)
        self.norm = norm
        self._prompt_lengths: set[int] = set()
        self._warmup_prompt: str | None = None  # a checked task's instruction: the warm-up call's prompt
        self.precision_report: dict[str, Any] | None = None  # set when a precision plan was applied
        self.attach_engine(engine)
        self._generator = torch.Generator().manual_seed(seed)

    def attach_engine(self, engine: Any) -> None:
        """Run calls through `engine` (None: the model directly). Engines copy host inputs into their own static
        buffers; otherwise inputs move to the device in the transforms."""
        self.engine = engine
        input_device = "cpu" if engine is not None and getattr(engine, "name", "") != "eager" else self.device
        state_stats = {"state": self.norm_stats["state"]} if "state" in self.norm_stats else {}
        self._inputs = Compose(
            (
                LiberoInputs(),
                Normalize(state_stats, self.norm),
                TokenizePrompt(self.tokenizer),
                PadStatesAndActions(self.action_dim),
                ToTensors(input_device),
                ImagesToFloat(),
            )
        )
        self._outputs = Compose((Unnormalize({"actions": self.norm_stats["actions"]}, self.norm), LiberoOutputs()))

    def check_task(self, task: TaskInfo) -> None:
        """Every LIBERO task is attempted; a prompt that will be truncated is only warned about (here, up front)."""
        state = np.zeros(LIBERO_STATE_DIM) if self.tokenizer.prompt_format == "pi05" else None
        tok = self.tokenizer(task.language, state)
        self._prompt_lengths.add(tok.num_tokens)
        self._warmup_prompt = self._warmup_prompt or task.language
        if tok.truncated:
            logger.warning("%s task %d: prompt truncated to %d tokens", task.suite, task.task_id, tok.num_tokens)

    def reset(self) -> None:
        """Nothing to reset: each call is independent (the noise stream continues)."""

    def reseed(self, seed: int) -> None:
        """Restart the noise stream, e.g. per episode so a resumed run draws the same noise as an uninterrupted one."""
        self._generator.manual_seed(seed)

    def warmup(self) -> float:
        """One call on a dummy observation (noise stream left untouched); returns its seconds."""
        start = time.perf_counter()
        if self.engine is not None:  # build every prompt bucket the tasks need before the first timed call
            self.engine.prepare(self._prompt_lengths or {self.tokenizer(dummy_observation().prompt).num_tokens})
        state = self._generator.get_state()
        try:  # with a task's prompt, the call lands in a bucket built above (the default one may not be needed)
            self.infer(dummy_observation(self._warmup_prompt) if self._warmup_prompt else dummy_observation())
        finally:
            self._generator.set_state(state)
        if self.uses_cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def sample_noise(self) -> torch.Tensor:
        """The next noise draw: [1, H, action_dim] fp32 on the CPU."""
        shape = (1, self.action_horizon, self.action_dim)
        return torch.randn(shape, generator=self._generator, dtype=torch.float32)

    def model_inputs(self, obs: Observation, noise: torch.Tensor | None = None) -> tuple[dict[str, Any], tuple]:
        """(transformed data, (images, image_masks, tokens, token_mask, noise)) for `sample_actions`."""
        raw = {"image": obs.image, "wrist_image": obs.wrist_image, "state": obs.state, "prompt": obs.prompt}
        data = self._inputs(raw)
        images = torch.stack([data["images"][k] for k in IMAGE_KEYS], dim=1)  # [1, 3, 3, 224, 224]
        image_masks = torch.cat([data["image_masks"][k] for k in IMAGE_KEYS]).view(1, -1)  # [1, 3]
        noise = (self.sample_noise() if noise is None else noise).to(self.device, torch.float32)  # [1, H, 32]
        return data, (images, image_masks, data["tokens"], data["token_mask"], noise)

    def robot_actions(self, model_out: torch.Tensor) -> np.ndarray:
        """Model output [1, H, 32] -> unnormalized LIBERO actions [H, 7] float64 (synchronizes)."""
        return self._outputs({"actions": model_out[0].float().cpu().numpy()})["actions"]

    def infer(self, obs: Observation, noise: torch.Tensor | None = None) -> ActionChunk:
        """Actions [H, 7] for one observation; `noise` [1, H, action_dim] overrides the policy's noise stream."""
        t0 = time.perf_counter()
        data, inputs = self.model_inputs(obs, noise)
        t1 = time.perf_counter()
        sample = self.model.sample_actions if self.engine is None else self.engine.sample_actions
        with torch.inference_mode():
            out = sample(*inputs, num_steps=self.num_steps)
        model_actions = out[0].float().cpu().numpy()  # [H, 32], synchronizes
        t2 = time.perf_counter()
        actions = self._outputs({"actions": model_actions})["actions"]  # [H, 7] float64
        if not np.isfinite(actions).all():
            raise ValueError(
                f"policy {self.name!r} produced non-finite actions ({int(np.isnan(actions).sum())} NaN, "
                f"{int(np.isinf(actions).sum())} inf of {actions.size}) for prompt {obs.prompt!r}; "
                "check the weights and the precision"
            )
        t3 = time.perf_counter()
        stage_ms = {"preprocess": 1e3 * (t1 - t0), "model": 1e3 * (t2 - t1), "postprocess": 1e3 * (t3 - t2)}
        if self.engine is not None:
            stage_ms.update(self.engine.stage_ms())  # CUDA-event vision / prefill / denoise
        info = {"prompt_truncated": bool(data["prompt_truncated"]), "prompt_tokens": int(data["prompt_tokens"])}
        return ActionChunk(actions=actions, stage_ms=stage_ms, info=info)


def dummy_observation(prompt: str = "pick up the black bowl and place it on the plate") -> Observation:
    """A synthetic LIBERO-shaped observation (mid-grey images, zero state) for warm-up and tests."""
    image = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 128, dtype=np.uint8)
    return Observation(image=image, wrist_image=image.copy(), state=np.zeros(LIBERO_STATE_DIM), prompt=prompt)


def resolve_device(device: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"policy.device={device!r} but CUDA is not available (use device=auto or cpu)")
    return dev


def _check_choices(engine: str, prompt_format: str, norm: str) -> None:
    for key, value, choices in (
        ("engine", engine, ENGINES),
        ("prompt_format", prompt_format, PROMPT_FORMATS),
        ("norm", norm, NORM_MODES),
    ):
        if value not in choices:
            raise ValueError(f"unknown policy.{key} {value!r}; choices: {', '.join(choices)}")


def build_pi05_policy(
    name: str,
    checkpoint: str | Path,
    precision: str | Mapping[str, Any] = "bf16",
    num_steps: int = 10,
    device: str = "auto",
    tokenizer: str | Path | None = None,
    prompt_format: PromptFormat = "pi0",
    norm: NormMode = "quantile",
    engine: str = "eager",
    engine_options: Mapping[str, Any] | None = None,
    seed: int = 0,
    cpu_threads: int | None = None,
    cache_dir: str | Path | None = None,
    asset_id: str = DEFAULT_ASSET_ID,
) -> Pi05Policy:
    """Resolve the bundle, load the model and build the policy; every check runs before any simulation.

    `precision`: "bf16" / "fp32", or a per-component plan (`pi05eval/precision/plan.py`, conf/policy/precision/).
    """
    from pi05eval.precision.plan import PrecisionPlan, check_hardware
    from pi05eval.precision.quantize import check_engine

    _check_choices(engine, prompt_format, norm)
    if num_steps < 1:
        raise ValueError(f"policy.num_steps must be ≥ 1, got {num_steps}")
    plan = PrecisionPlan.parse(precision)
    check_engine(plan, engine)
    dev = resolve_device(device)
    check_hardware(plan, torch.cuda.get_device_capability(dev) if dev.type == "cuda" else None)
    if engine == "tensorrt":  # a missing TensorRT fails here, before loading weights or any simulation
        from pi05eval.engines.tensorrt import require_tensorrt

        require_tensorrt()
    if dev.type == "cpu" and cpu_threads:
        # torch's CPU threads compete with the env workers' software rendering; few threads run faster overall
        torch.set_num_threads(cpu_threads)
    bundle = resolve_bundle(checkpoint, cache_dir, tokenizer=tokenizer, asset_id=asset_id)
    cfg = bundle.model_config
    tok = PromptTokenizer(bundle.tokenizer, max_len=cfg.max_token_len, prompt_format=prompt_format)
    if tok.vocab_size > cfg.vocab_size:
        raise BundleError(
            f"tokenizer {bundle.tokenizer} has {tok.vocab_size} pieces, more than the model's vocab_size "
            f"{cfg.vocab_size}: wrong tokenizer for {bundle.source}"
        )
    start = time.perf_counter()
    model = load_pi05(bundle.weights, cfg, precision=plan.compute, device=str(dev))
    model.eval()
    load_s = time.perf_counter() - start
    logger.info("loaded %s (%s, %s) on %s in %.1f s", bundle.source, bundle.variant, plan.compute, dev, load_s)
    policy = Pi05Policy(
        name,
        model,
        tok,
        bundle.norm_stats,
        action_horizon=cfg.action_horizon,
        action_dim=cfg.action_dim,
        num_steps=num_steps,
        norm=norm,
        device=dev,
        seed=seed,
    )
    if not plan.is_exact:
        from pi05eval.precision.prepare import apply_to_policy

        apply_to_policy(policy, plan, engine)
    from pi05eval.engines import build_engine, parse_engine_spec

    if plan.simulate and engine != "eager":
        logger.warning("precision.simulate=true: running eagerly (fake quantization), not with engine=%s", engine)
        engine, engine_options = "eager", None
    spec = parse_engine_spec(engine + (":" + ",".join(_option_items(engine_options)) if engine_options else ""))
    policy.attach_engine(build_engine(spec, policy.model, num_steps, precision=plan.label))
    return policy


def _option_items(options: Mapping[str, Any]) -> list[str]:
    """{"trim_prefix": False, "mode": "default"} -> ["-trim_prefix", "mode=default"] (engine spec syntax)."""
    items = []
    for k, v in options.items():
        if v is None:
            continue
        if isinstance(v, bool):
            items.append(("" if v else "-") + k)
        elif isinstance(v, (list, tuple)):
            items.append(f"{k}={'/'.join(str(x) for x in v)}")
        else:
            items.append(f"{k}={v}")
    return items
