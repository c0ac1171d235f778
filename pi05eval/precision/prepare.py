"""Apply a precision plan to a built `Pi05Policy`: calibration observations, ModelOpt, real kernels, fidelity.

Order (all before any evaluation episode): record / load the suite's calibration observations → actions of the
unmodified model on the held-out ones (the reference, in the plan's compute dtype) → `apply_plan` → actions of the
plan on the same observations and noise → per-component errors (ModelOpt fake-quant with one component on at a
time) → `policy.precision_report`, which the run writes into its manifest and `summary.json`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pi05eval.policy.base import Observation
from pi05eval.precision.calibration import calibration_set
from pi05eval.precision.fidelity import ledger
from pi05eval.precision.plan import PrecisionPlan
from pi05eval.precision.quantize import QuantizedModel, apply_plan, enable_only

log = logging.getLogger(__name__)

NOISE_SEED = 20_241  # the held-out chunks' noise: the same for every variant compared


def _noises(policy: Any, n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(NOISE_SEED)
    shape = (1, policy.action_horizon, policy.action_dim)
    return [torch.randn(shape, generator=gen) for _ in range(n)]


@torch.inference_mode()
def _actions(policy: Any, model: torch.nn.Module, observations: Sequence[Observation], noises) -> list[np.ndarray]:
    out = []
    for obs, noise in zip(observations, noises, strict=True):
        _, inputs = policy.model_inputs(obs, noise)
        out.append(policy.robot_actions(model.sample_actions(*inputs, num_steps=policy.num_steps)))
    return out


def apply_to_policy(policy: Any, plan: PrecisionPlan, engine: str) -> QuantizedModel | None:
    """Quantize `policy.model` in place per `plan`; sets `policy.precision_report`. None for an exact plan."""
    if plan.is_exact:
        return None
    start = time.perf_counter()
    calib = calibration_set(plan.calibration)
    calib_obs, held_out = calib.split(plan.calibration.num_obs)
    noises = _noises(policy, len(held_out))
    reference = _actions(policy, policy.model, held_out, noises) if held_out else []
    calib_noises = _noises(policy, len(calib_obs))

    def forward_loop(model: torch.nn.Module) -> None:
        _actions(policy, model, calib_obs, calib_noises)

    quantized = apply_plan(
        policy.model, plan, forward_loop if plan.quantized else None, fake_quant_only=engine == "tensorrt"
    )
    policy.model = quantized.model
    fidelity = None
    if held_out:
        per_component = {}
        fq = quantized.fake_quant
        if fq is not None and len(plan.quantized) > 1:
            for comp in plan.quantized:

                def run(comp: str = comp) -> list[np.ndarray]:
                    enable_only(fq, plan, comp)
                    return _actions(policy, fq, held_out, noises)

                per_component[comp] = run
        fidelity = ledger(
            reference,
            _actions(policy, quantized.model, held_out, noises),
            per_component,
            reference=f"{plan.compute} (same model, no plan)",
            components_measured_with="ModelOpt fake quantization, one component quantized at a time",
        )
        if fq is not None:
            enable_only(fq, plan, None)
    if quantized.fake_quant is not quantized.model:
        quantized.fake_quant = None  # the calibration copy: free it
    policy.precision_report = {
        **quantized.describe(),
        "fidelity": fidelity,
        "calibration": {**calib.meta, "num_obs": len(calib_obs), "holdout": len(held_out)},
        "prepare_s": round(time.perf_counter() - start, 2),
    }
    if fidelity:
        f = fidelity["plan"]
        log.info(
            "precision %s: cosine %.5f, max|Δ| %.4g, nMSE %.3g vs %s on %d held-out observations",
            plan.label,
            f["cosine"],
            f["max_abs"],
            f["nmse"],
            plan.compute,
            f["n"],
        )
    return quantized
