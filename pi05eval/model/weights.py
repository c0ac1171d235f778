"""Pi0.5 checkpoints: declarative key maps (openpi PyTorch / lerobot layouts -> `Pi05Model` names), strict checks
from the safetensors header, zero-copy loading (meta build + mmap + `assign=True`), and an openpi-layout writer.

Layouts (SPEC §10): openpi's `model.safetensors` stores the tied token embedding as `paligemma.lm_head.weight` and
may carry the unused `gemma_expert.lm_head.weight` (ignored); lerobot prefixes every key with `model.` and may
also carry `...language_model.embed_tokens.weight` (the same tied table; either name is accepted).
"""

from __future__ import annotations

import logging
import re
import time
from os import PathLike
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pi05eval.errors import SetupError
from pi05eval.model.config import Pi05Config
from pi05eval.model.pi05 import Pi05Model, Precision

logger = logging.getLogger(__name__)

_PG = "paligemma_with_expert.paligemma."
_VIS = _PG + "model.vision_tower.vision_model."
_LM = _PG + "model.language_model."
_EX = "paligemma_with_expert.gemma_expert.model."

# openpi PyTorch key template -> Pi05Model parameter template ("{}" = layer index). One-to-one, so invertible.
OPENPI_KEY_MAP: dict[str, str] = {
    _VIS + "embeddings.patch_embedding.weight": "vision.patch_embed.weight",
    _VIS + "embeddings.patch_embedding.bias": "vision.patch_embed.bias",
    _VIS + "embeddings.position_embedding.weight": "vision.pos_embed",
    **{
        _VIS + f"encoder.layers.{{}}.{theirs}.{wb}": f"vision.layers.{{}}.{ours}.{wb}"
        for theirs, ours in [
            ("layer_norm1", "norm1"),
            ("layer_norm2", "norm2"),
            ("self_attn.q_proj", "attn.q_proj"),
            ("self_attn.k_proj", "attn.k_proj"),
            ("self_attn.v_proj", "attn.v_proj"),
            ("self_attn.out_proj", "attn.o_proj"),
            ("mlp.fc1", "mlp.fc1"),
            ("mlp.fc2", "mlp.fc2"),
        ]
        for wb in ("weight", "bias")
    },
    _VIS + "post_layernorm.weight": "vision.norm.weight",
    _VIS + "post_layernorm.bias": "vision.norm.bias",
    _PG + "model.multi_modal_projector.linear.weight": "projector.weight",
    _PG + "model.multi_modal_projector.linear.bias": "projector.bias",
    _PG + "lm_head.weight": "llm.embed",
    **{
        f"{prefix}layers.{{}}.{theirs}.weight": f"{ours_prefix}.layers.{{}}.{ours}.weight"
        for prefix, ours_prefix in [(_LM, "llm"), (_EX, "expert")]
        for theirs, ours in [
            ("self_attn.q_proj", "attn.q_proj"),
            ("self_attn.k_proj", "attn.k_proj"),
            ("self_attn.v_proj", "attn.v_proj"),
            ("self_attn.o_proj", "attn.o_proj"),
            ("mlp.gate_proj", "mlp.gate_proj"),
            ("mlp.up_proj", "mlp.up_proj"),
            ("mlp.down_proj", "mlp.down_proj"),
        ]
    },
    _LM + "layers.{}.input_layernorm.weight": "llm.layers.{}.attn_norm.weight",
    _LM + "layers.{}.post_attention_layernorm.weight": "llm.layers.{}.mlp_norm.weight",
    _LM + "norm.weight": "llm.norm.weight",
    **{
        f"{_EX}layers.{{}}.{theirs}.dense.{wb}": f"expert.layers.{{}}.{ours}.dense.{wb}"
        for theirs, ours in [("input_layernorm", "attn_norm"), ("post_attention_layernorm", "mlp_norm")]
        for wb in ("weight", "bias")
    },
    _EX + "norm.dense.weight": "expert.norm.dense.weight",
    _EX + "norm.dense.bias": "expert.norm.dense.bias",
    **{
        f"{name}.{wb}": f"{ours}.{wb}"
        for name, ours in [
            ("action_in_proj", "action_in"),
            ("action_out_proj", "action_out"),
            ("time_mlp_in", "time_in"),
            ("time_mlp_out", "time_out"),
        ]
        for wb in ("weight", "bias")
    },
}
# Other names for the same tensors (the tied embedding as lerobot / `model.state_dict()` names it).
OPENPI_KEY_ALIASES: dict[str, str] = {_LM + "embed_tokens.weight": "llm.embed"}
# Present in real checkpoints, never used by the model.
IGNORED_KEYS: frozenset[str] = frozenset({"paligemma_with_expert.gemma_expert.lm_head.weight"})
LAYOUT_PREFIXES: dict[str, str] = {"openpi": "", "lerobot": "model."}
_FLOAT_DTYPES = frozenset({"BF16", "F16", "F32", "F64"})
_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")
_OURS_TO_OPENPI = {ours: theirs for theirs, ours in OPENPI_KEY_MAP.items()}


class CheckpointError(SetupError, ValueError):
    """A checkpoint whose keys or shapes do not match the model config; the message names the keys."""


def _template(key: str) -> tuple[str, list[str]]:
    return _INDEX.sub("{}", key), _INDEX.findall(key)


def detect_layout(keys: list[str]) -> str:
    """Layout name: `lerobot` when the keys carry lerobot's `model.` prefix, else `openpi`."""
    return "lerobot" if any(k.startswith("model.paligemma_with_expert.") for k in keys) else "openpi"


def map_key(key: str, layout: str = "openpi") -> str | None:
    """Checkpoint key -> `Pi05Model` parameter name, or None when the key is not part of the map."""
    prefix = LAYOUT_PREFIXES[layout]
    if not key.startswith(prefix):
        return None
    template, index = _template(key[len(prefix) :])
    ours = OPENPI_KEY_MAP.get(template) or OPENPI_KEY_ALIASES.get(template)
    return ours.format(*index) if ours is not None else None


def checkpoint_key(param_name: str, layout: str = "openpi") -> str:
    """`Pi05Model` parameter name -> its canonical key in a checkpoint layout."""
    template, index = _template(param_name)
    return LAYOUT_PREFIXES[layout] + _OURS_TO_OPENPI[template].format(*index)


def model_shapes(cfg: Pi05Config) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of `Pi05Model(cfg)` (built on the meta device: no memory, no init cost)."""
    with torch.device("meta"):
        model = Pi05Model(cfg)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def openpi_shapes(cfg: Pi05Config, *, include_unused: bool = True) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an openpi-layout checkpoint for `cfg` (with the unused expert lm_head if asked)."""
    shapes = {checkpoint_key(name): shape for name, shape in model_shapes(cfg).items()}
    if include_unused:
        shapes["paligemma_with_expert.gemma_expert.lm_head.weight"] = (cfg.vocab_size, cfg.expert_width)
    return shapes


def _fmt(items: list[str], limit: int = 5) -> str:
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def plan_load(
    header: dict[str, tuple[tuple[int, ...], str]], cfg: Pi05Config, source: str = "checkpoint"
) -> dict[str, str]:
    """Checkpoint header {key: (shape, dtype)} -> {key: parameter name}; raises CheckpointError on any mismatch."""
    expected = model_shapes(cfg)
    layout = detect_layout(list(header))
    prefix = LAYOUT_PREFIXES[layout]
    mapping: dict[str, str] = {}
    seen: set[str] = set()
    unexpected: list[str] = []
    misshaped: list[str] = []
    for key in sorted(header):
        shape, dtype = header[key]
        if key.startswith(prefix) and key[len(prefix) :] in IGNORED_KEYS:
            continue
        ours = map_key(key, layout)
        if ours is None or ours not in expected:
            unexpected.append(key)
        elif tuple(shape) != expected[ours] or dtype not in _FLOAT_DTYPES:
            misshaped.append(f"{key} {tuple(shape)} {dtype} (model wants {expected[ours]}, float)")
            seen.add(ours)
        elif ours not in seen:  # a tied alias of a tensor already mapped is not loaded twice
            mapping[key] = ours
            seen.add(ours)
    missing = [checkpoint_key(name, layout) for name in expected if name not in seen]
    if missing or unexpected or misshaped:
        parts = [f"{source} ({layout} layout) does not match the model config:"]
        for label, items in (("missing", missing), ("unexpected", unexpected), ("misshaped", misshaped)):
            if items:
                parts.append(f"{len(items)} {label} key(s): {_fmt(items)}")
        raise CheckpointError("\n  ".join(parts))
    return mapping


def _read_header(f: safe_open) -> dict[str, tuple[tuple[int, ...], str]]:
    """{key: (shape, safetensors dtype name)} without reading any tensor data."""
    header = {}
    for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
        view = f.get_slice(key)
        header[key] = (tuple(view.get_shape()), view.get_dtype())
    return header


def check_checkpoint(path: str | PathLike, cfg: Pi05Config) -> None:
    """Raise CheckpointError naming missing / unexpected / misshaped keys; reads only the safetensors header."""
    with safe_open(str(path), framework="pt") as f:
        plan_load(_read_header(f), cfg, source=str(path))


def load_pi05(
    path: str | PathLike, cfg: Pi05Config, precision: Precision = "bf16", device: str | torch.device = "cpu"
) -> Pi05Model:
    """Strictly load a safetensors checkpoint (openpi or lerobot layout) into an eval-mode `Pi05Model`.

    Keys and shapes are checked from the header before any tensor is read. The model is built on the meta
    device and takes the (memory-mapped on CPU) file tensors directly: no second copy of the weights.
    """
    start = time.perf_counter()
    device = torch.device(device)
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        mapping = plan_load(_read_header(f), cfg, source=str(path))
        state = {ours: f.get_tensor(key) for key, ours in mapping.items()}
    with torch.device("meta"):
        model = Pi05Model(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    model.set_precision(precision).eval().requires_grad_(False)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    logger.info(
        "loaded %s: %d tensors, %.2f GB as %s on %s in %.2f s",
        path, len(state), nbytes / 1e9, precision, device, time.perf_counter() - start,
    )  # fmt: skip
    return model


def save_openpi_layout(model: Pi05Model, path: str | PathLike, dtype: torch.dtype | None = torch.bfloat16) -> None:
    """Write `model` as an openpi-layout `model.safetensors` (bf16 like openpi's files; `dtype=None` keeps each)."""
    tensors = {}
    for name, param in model.named_parameters():
        t = param.detach().to("cpu")
        tensors[checkpoint_key(name)] = (t if dtype is None else t.to(dtype)).contiguous()
    save_file(tensors, str(Path(path)), metadata={"format": "pt", "layout": "openpi"})
