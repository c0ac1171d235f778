"""Precision plans in the latency benchmark (`python -m pi05eval.bench --precisions ...`).

Each preset (or inline `prefix.mlp=fp8,...` plan) quantizes a copy of the bf16 model, calibrated on recorded LIBERO
frames (`--calib`, or synthetic calls), then every non-eager engine spec is timed on it with its agreement against
eager bf16 of the unquantized model on held-out calls.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pi05eval.bench import LIBERO_DIMS, libero_inputs, profile_kernels, run_config


def calibration_inputs(cfg, count: int, prompt_len: int, path: str | None) -> list[tuple[torch.Tensor, ...]]:
    """`count` batch-1 calls: recorded LIBERO frames from a calibration file (random prompt tokens: the weights are
    random too), or synthetic ones."""
    calls = [libero_inputs(cfg, 1, prompt_len, seed=1000 + i) for i in range(count)]
    if path:
        from pi05eval.precision.calibration import load

        observations = load(Path(path)).observations
        if len(observations) < count:
            raise ValueError(f"{path} holds {len(observations)} observations, {count} needed")
        for call, obs in zip(calls, observations, strict=False):
            for slot, img in enumerate((obs.image, obs.wrist_image)):
                x = torch.from_numpy(img).permute(2, 0, 1).float()[None] / 127.5 - 1.0  # [1, 3, 224, 224]
                call[0][0, slot] = F.interpolate(x, size=cfg.image_size, mode="bilinear")[0]
    return calls


def precision_preset(name: str) -> dict[str, Any]:
    """conf/policy/precision/<name>.yaml composed (its defaults applied), or inline `prefix.mlp=fp8,...`."""
    if "=" in name:
        return dict(item.split("=", 1) for item in name.split(","))
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from pi05eval.app import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["policy=eager_bf16", f"policy/precision={name}"])
    plan = OmegaConf.to_container(cfg.policy.precision, resolve=False)
    plan.pop("calibration", None)
    return plan


def run_precision(model, name: str, specs, inputs, args, refs, calib) -> list[dict[str, Any]]:
    """Quantize a copy of the bf16 model per a precision preset, then time every non-eager spec on it."""
    from pi05eval.precision.plan import PrecisionPlan, check_hardware
    from pi05eval.precision.quantize import apply_plan, check_engine

    plan = PrecisionPlan.parse(precision_preset(name))
    dev = model.action_in.weight.device
    check_engine(plan, "compile")
    check_hardware(plan, torch.cuda.get_device_capability(dev) if dev.type == "cuda" else None)
    calib_calls, held = calib[: args.calib_n], calib[args.calib_n :]
    with torch.no_grad():
        reference = [
            model.sample_actions(*[x.to(dev) for x in c], num_steps=args.steps)[0, :, :LIBERO_DIMS]
            .float()
            .cpu()
            .numpy()
            for c in held
        ]

    def loop(m) -> None:
        with torch.no_grad():
            for c in calib_calls:
                m.sample_actions(*[x.to(dev) for x in c], num_steps=args.steps)

    t0 = time.perf_counter()
    quantized = apply_plan(copy.deepcopy(model), plan, loop)
    quantize_s = time.perf_counter() - t0
    out = []
    for spec in specs:
        if spec.name == "eager" and not args.eager_quantized:
            continue
        r = run_config(quantized.model, spec, inputs, args, refs, precision=plan.label, held_out=(held, reference))
        r.update(quantize_s=quantize_s, layers=quantized.describe()["layers"])
        if name == args.profile_precision and dev.type == "cuda":  # which kernels the quantized call launches
            path = f"{args.profile or 'profile'}.{name}.txt"
            r["profile"] = profile_kernels(quantized.model, spec, inputs, args.steps, path, precision=plan.label)
        out.append(r)
    del quantized
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out
