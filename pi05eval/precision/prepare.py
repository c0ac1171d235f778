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
from pi05eval.precision import scales
from pi05eval.precision.calibration import calibration_set
from pi05eval.precision.fidelity import ledger
from pi05eval.precision.plan import PrecisionPlan
from pi05eval.precision.quantize import QuantizedModel, apply_plan, enable_only, layers_of

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


def _per_component(policy: Any, q: QuantizedModel, held_out, noises) -> dict[str, Any]:
    """One quantized component at a time (only when the plan has several): real layers swapped in and out, or the
    fake-quant model's quantizers switched."""
    comps = list(q.plan.quantized)
    if len(comps) < 2:
        return {}
    runs = {}
    for comp in comps:
        if q.originals is not None:

            def run(comp: str = comp) -> list[np.ndarray]:
                swapped = layers_of(q.originals, comp)
                scales.restore(q.model, {n: m for n, m in q.originals.items() if n not in swapped})
                try:
                    return _actions(policy, q.model, held_out, noises)
                finally:
                    scales.realize(q.model, q.scales, only=set(q.originals) - swapped)

        elif q.fake_quant is not None:

            def run(comp: str = comp) -> list[np.ndarray]:
                enable_only(q.fake_quant, q.plan, comp)
                try:
                    return _actions(policy, q.fake_quant, held_out, noises)
                finally:
                    enable_only(q.fake_quant, q.plan, None)

        else:
            continue
        runs[comp] = run
    return runs


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

    key = scales.scales_key(policy.model, plan, {**calib.meta, "num_obs": len(calib_obs)})
    quantized = apply_plan(
        policy.model,
        plan,
        forward_loop if plan.quantized else None,
        fake_quant_only=engine == "tensorrt",
        scales_cache=scales.default_dir() / f"{key}.pt",
        keep_originals=bool(held_out),
    )
    policy.model = quantized.model
    fidelity = None
    if held_out:
        fidelity = ledger(
            reference,
            _actions(policy, quantized.model, held_out, noises),
            _per_component(policy, quantized, held_out, noises),
            reference=f"{plan.compute} (same model, no plan)",
            components_measured_with="fake quantization" if quantized.simulated else "real kernels",
        )
    quantized.originals = None  # the float layers are no longer needed
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
