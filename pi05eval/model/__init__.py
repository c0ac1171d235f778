"""Pi0.5 in plain PyTorch: config + variant table, the model and its stages, strict checkpoint loading."""

from __future__ import annotations

from pi05eval.model.config import VARIANTS, CallCost, Pi05Config, estimate_call_cost, get_config, param_count
from pi05eval.model.pi05 import PRECISIONS, Pi05Model, Precision, PrefixCache, euler_schedule, keeps_fp32
from pi05eval.model.weights import CheckpointError, check_checkpoint, load_pi05, save_openpi_layout

__all__ = [
    "PRECISIONS",
    "VARIANTS",
    "CallCost",
    "CheckpointError",
    "Pi05Config",
    "Pi05Model",
    "Precision",
    "PrefixCache",
    "check_checkpoint",
    "estimate_call_cost",
    "euler_schedule",
    "get_config",
    "keeps_fp32",
    "load_pi05",
    "param_count",
    "save_openpi_layout",
]
