"""The exactness ledger: how closely an approximate precision plan's actions follow the bf16 reference.

Actions are compared in the robot's action space ([H, 7], unnormalized: what LIBERO executes) on held-out recorded
observations, with the same noise for every variant. Per chunk: cosine of the flattened chunks; over all chunks:
max |Δ| and the normalized MSE (mean squared difference over the reference's variance).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def agreement(reference: Sequence[np.ndarray], test: Sequence[np.ndarray]) -> dict[str, float]:
    """Action chunks [H, D] of a reference and a variant, pairwise -> cosine (mean, min), max_abs, nmse."""
    if len(reference) != len(test) or not reference:
        raise ValueError(f"need equally many chunks (≥ 1), got {len(reference)} and {len(test)}")
    ref = np.stack([np.asarray(r, dtype=np.float64) for r in reference])  # [N, H, D]
    out = np.stack([np.asarray(t, dtype=np.float64) for t in test])
    if ref.shape != out.shape:
        raise ValueError(f"action shapes differ: {ref.shape} vs {out.shape}")
    a, b = ref.reshape(len(ref), -1), out.reshape(len(out), -1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(norms > 0, (a * b).sum(axis=1) / np.maximum(norms, 1e-300), 1.0)
    var = float(ref.var())
    mse = float(((out - ref) ** 2).mean())
    return {
        "cosine": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "max_abs": float(np.abs(out - ref).max()),
        "nmse": mse / var if var > 0 else (0.0 if mse == 0 else math.inf),
        "n": len(ref),
    }


def ledger(
    reference_actions: Sequence[np.ndarray],
    plan_actions: Sequence[np.ndarray],
    per_component: dict[str, Callable[[], Sequence[np.ndarray]]] | None = None,
    **labels: Any,
) -> dict[str, Any]:
    """{"plan": agreement, "components": {component: agreement}, **labels}; components run lazily, one at a time."""
    out: dict[str, Any] = {"plan": agreement(reference_actions, plan_actions), **labels}
    if per_component:
        out["components"] = {c: agreement(reference_actions, run()) for c, run in per_component.items()}
    return out
