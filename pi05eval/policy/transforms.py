"""Pi0.5 input/output transforms for LIBERO, as small frozen dataclasses composed in order (SPEC-pi05.md §7).

A transform maps a data dict to a new data dict. Inputs, in the order `Pi05Policy` composes them:
`LiberoInputs` (cameras → base / left wrist / masked right wrist) → `Normalize` (state) → `TokenizePrompt` →
`PadStatesAndActions` (32) → `ToTensors` (batch of 1 on the model's device) → `ImagesToFloat` ([-1, 1], CHW).
Outputs, symmetric: `Unnormalize` (actions) → `LiberoOutputs` (first 7 dims).

Normalization (openpi's, eps 1e-6): quantile ``(x − q01)/(q99 − q01 + 1e-6)·2 − 1`` and its inverse
``(x + 1)/2·(q99 − q01 + 1e-6) + q01``; z-score ``(x − mean)/(std + 1e-6)`` and ``x·(std + 1e-6) + mean``.
Unnormalize touches only the first ``len(stats)`` dims and passes the rest through.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from pi05eval.policy.tokenizer import PromptTokenizer

NormMode = Literal["quantile", "zscore"]
NORM_MODES: tuple[str, ...] = ("quantile", "zscore")
NORM_EPS = 1e-6
IMAGE_KEYS: tuple[str, ...] = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")  # model camera order
IMAGE_SIZE = 224
MODEL_ACTION_DIM = 32  # state/action width inside Pi0.5
LIBERO_ACTION_DIM = 7

Data = dict[str, Any]
Transform = Callable[[Data], Data]


@dataclass(frozen=True)
class NormStats:
    """Per-dimension statistics of one key (openpi's norm_stats.json entry)."""

    mean: np.ndarray  # [D] float64
    std: np.ndarray  # [D]
    q01: np.ndarray | None = None  # [D] 1st percentile
    q99: np.ndarray | None = None  # [D] 99th percentile

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "norm stats") -> NormStats:
        """Parse ``{"mean": [...], "std": [...], "q01": [...], "q99": [...]}``; q01/q99 optional."""
        missing = [k for k in ("mean", "std") if k not in d]
        if missing:
            raise ValueError(f"{where}: missing {missing} (has {sorted(d)})")
        arrays = {k: np.asarray(d[k], dtype=np.float64).reshape(-1) for k in ("mean", "std", "q01", "q99") if k in d}
        dims = {k: a.shape[0] for k, a in arrays.items()}
        if len(set(dims.values())) != 1:
            raise ValueError(f"{where}: statistics of different lengths {dims}")
        return cls(**arrays)

    def to_dict(self) -> dict[str, list[float]]:
        out = {"mean": self.mean.tolist(), "std": self.std.tolist()}
        if self.q01 is not None and self.q99 is not None:
            out |= {"q01": self.q01.tolist(), "q99": self.q99.tolist()}
        return out

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])


def _check_mode(mode: str) -> None:
    if mode not in NORM_MODES:
        raise ValueError(f"unknown normalization {mode!r}; choices: {', '.join(NORM_MODES)}")


def _quantiles(stats: NormStats) -> tuple[np.ndarray, np.ndarray]:
    if stats.q01 is None or stats.q99 is None:
        raise ValueError("quantile normalization needs q01 and q99 in the norm stats (or use norm='zscore')")
    return stats.q01, stats.q99


def normalize(x: np.ndarray, stats: NormStats, mode: NormMode) -> np.ndarray:
    """Normalize the last axis of x (≤ stats.dim entries) with the first x.shape[-1] statistics."""
    _check_mode(mode)
    d = x.shape[-1]
    if d > stats.dim:
        raise ValueError(f"cannot normalize {d} dims with {stats.dim}-dim statistics")
    if mode == "quantile":
        q01, q99 = _quantiles(stats)
        return (x - q01[:d]) / (q99[:d] - q01[:d] + NORM_EPS) * 2.0 - 1.0
    return (x - stats.mean[:d]) / (stats.std[:d] + NORM_EPS)


def unnormalize(x: np.ndarray, stats: NormStats, mode: NormMode) -> np.ndarray:
    """Inverse of `normalize` on the first stats.dim entries of the last axis; further entries pass through."""
    _check_mode(mode)
    d = min(stats.dim, x.shape[-1])
    head = x[..., :d]
    if mode == "quantile":
        q01, q99 = _quantiles(stats)
        head = (head + 1.0) / 2.0 * (q99[:d] - q01[:d] + NORM_EPS) + q01[:d]
    else:
        head = head * (stats.std[:d] + NORM_EPS) + stats.mean[:d]
    return np.concatenate([head, x[..., d:]], axis=-1)


@dataclass(frozen=True)
class LiberoInputs:
    """openpi LIBERO client keys → model cameras: base = agentview, left wrist = wrist, right wrist = zeros (masked)."""

    def __call__(self, data: Data) -> Data:
        base = np.asarray(data["image"])
        out = {k: v for k, v in data.items() if k not in ("image", "wrist_image")}
        out["images"] = {
            "base_0_rgb": base,
            "left_wrist_0_rgb": np.asarray(data["wrist_image"]),
            "right_wrist_0_rgb": np.zeros_like(base),
        }
        out["image_masks"] = {"base_0_rgb": True, "left_wrist_0_rgb": True, "right_wrist_0_rgb": False}
        return out


@dataclass(frozen=True)
class Normalize:
    """Normalize every key that has statistics (at inference: ``state``)."""

    stats: Mapping[str, NormStats]
    mode: NormMode = "quantile"

    @staticmethod
    def _apply(x: np.ndarray, st: NormStats, mode: NormMode) -> np.ndarray:
        return normalize(x, st, mode)

    def __call__(self, data: Data) -> Data:
        out = dict(data)
        for key, st in self.stats.items():
            if key in out:
                out[key] = self._apply(np.asarray(out[key], dtype=np.float64), st, self.mode)
        return out


@dataclass(frozen=True)
class Unnormalize(Normalize):
    """Unnormalize every key that has statistics (at inference: ``actions``)."""

    @staticmethod
    def _apply(x: np.ndarray, st: NormStats, mode: NormMode) -> np.ndarray:
        return unnormalize(x, st, mode)


@dataclass(frozen=True)
class TokenizePrompt:
    """``prompt`` (+ normalized, unpadded ``state`` for the pi05 format) → tokens, token_mask, truncation flag."""

    tokenizer: PromptTokenizer

    def __call__(self, data: Data) -> Data:
        if "prompt" not in data:
            raise ValueError("the observation has no prompt")
        tok = self.tokenizer(str(data["prompt"]), data.get("state"))
        out = {k: v for k, v in data.items() if k != "prompt"}
        out |= {"tokens": tok.tokens, "token_mask": tok.mask}
        out |= {"prompt_truncated": tok.truncated, "prompt_tokens": tok.full_length}
        return out


@dataclass(frozen=True)
class PadStatesAndActions:
    """Zero-pad ``state`` and ``actions`` on the last axis to the model width."""

    dim: int = MODEL_ACTION_DIM

    def __call__(self, data: Data) -> Data:
        out = dict(data)
        for key in ("state", "actions"):
            if key in out:
                x = np.asarray(out[key])
                if x.shape[-1] > self.dim:
                    raise ValueError(f"{key} has {x.shape[-1]} dims, more than the model's {self.dim}")
                pad = [(0, 0)] * (x.ndim - 1) + [(0, self.dim - x.shape[-1])]
                out[key] = np.pad(x, pad)
        return out


@dataclass(frozen=True)
class ToTensors:
    """Arrays → torch tensors with a leading batch dim of 1 on `device` (images stay uint8 until on the device)."""

    device: str | torch.device = "cpu"

    def __call__(self, data: Data) -> Data:
        dev = torch.device(self.device)
        out = dict(data)
        # copies: observations may arrive as read-only arrays (torch refuses to wrap those without a warning)
        out["images"] = {k: torch.from_numpy(np.array(v))[None].to(dev) for k, v in data["images"].items()}
        out["image_masks"] = {k: torch.tensor([bool(v)], device=dev) for k, v in data["image_masks"].items()}
        if "state" in data:
            out["state"] = torch.as_tensor(np.asarray(data["state"], dtype=np.float32))[None].to(dev)  # [1, 32]
        out["tokens"] = torch.from_numpy(np.asarray(data["tokens"], dtype=np.int64))[None].to(dev)  # [1, L]
        out["token_mask"] = torch.from_numpy(np.asarray(data["token_mask"], dtype=bool))[None].to(dev)  # [1, L]
        return out


def image_to_float(image: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 [..., H, W, 3] → float32 [..., 3, H, W] in [-1, 1] (``x/255·2 − 1``, openpi's formula)."""
    x = torch.as_tensor(image)
    if x.dtype != torch.uint8:
        raise ValueError(f"images must be uint8, got {x.dtype}")
    if x.ndim < 3 or x.shape[-1] != 3 or x.shape[-3:-1] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(
            f"images must be [..., {IMAGE_SIZE}, {IMAGE_SIZE}, 3] (the env adapter resizes), got {tuple(x.shape)}"
        )
    return (x.to(torch.float32) / 255.0 * 2.0 - 1.0).movedim(-1, -3)  # [..., 3, H, W]


@dataclass(frozen=True)
class ImagesToFloat:
    """Every image uint8 HWC → float CHW in [-1, 1] (batch dims kept)."""

    def __call__(self, data: Data) -> Data:
        out = dict(data)
        out["images"] = {k: image_to_float(v) for k, v in data["images"].items()}
        return out


@dataclass(frozen=True)
class LiberoOutputs:
    """Keep the first `action_dim` action dims: [..., 32] → [..., 7]."""

    action_dim: int = LIBERO_ACTION_DIM

    def __call__(self, data: Data) -> Data:
        out = dict(data)
        out["actions"] = np.asarray(data["actions"])[..., : self.action_dim]
        return out


@dataclass(frozen=True)
class Compose:
    """Apply transforms in order."""

    transforms: Sequence[Transform]

    def __call__(self, data: Data) -> Data:
        for t in self.transforms:
            data = t(data)
        return data
