"""Checkpoint key maps and strict loading: the full-size openpi key list maps onto the model, broken checkpoints
fail early naming the keys, and openpi / lerobot layouts load to the same parameters."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pi05eval.model import (
    CheckpointError,
    Pi05Model,
    check_checkpoint,
    estimate_call_cost,
    get_config,
    load_pi05,
    param_count,
    save_openpi_layout,
)
from pi05eval.model.weights import IGNORED_KEYS, map_key, model_shapes

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "vectors" / "pi05_tiny_openpi"
TSV = VECTORS / "keys_openpi_fullsize_pi05.tsv"
EMBED = "paligemma_with_expert.paligemma.lm_head.weight"
PER_STEP_BYTES = ("expert_weight_bytes_per_step", "time_cond_bytes_per_step", "kv_bytes_per_step")
LM_EMBED = "paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"


def _tsv_rows() -> list[tuple[str, tuple[int, ...], str]]:
    if not TSV.exists():
        pytest.skip(f"full-size key list not found at {TSV}")
    rows = []
    for line in TSV.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, dtype = line.split("\t")
        rows.append((key, tuple(int(s) for s in shape.strip("()").split(",") if s.strip()), dtype))
    return rows


def test_every_fullsize_openpi_key_maps_with_its_shape() -> None:
    rows = _tsv_rows()
    shapes = model_shapes(get_config("pi05"))
    covered = set()
    for key, shape, _ in rows:
        if key in IGNORED_KEYS:
            continue
        ours = map_key(key)
        assert ours in shapes, f"{key} maps to {ours!r}, not a model parameter"
        assert shapes[ours] == shape, f"{key}: file {shape} vs model {shapes[ours]}"
        covered.add(ours)
    assert covered == set(shapes)
    # 811 parameters (SigLIP 437, projector 2, LLM 164, expert 200, heads 8) + the tied embedding's second name
    # + the unused expert lm_head
    assert len(shapes) == 811 and len(rows) == 813


def test_bf16_precision_keeps_exactly_openpis_fp32_parameters() -> None:
    """After set_precision("bf16") every parameter has the runtime dtype openpi's model has (TSV column 3)."""
    with torch.device("meta"):
        model = Pi05Model(get_config("pi05")).set_precision("bf16")
    dtypes = {name: str(p.dtype).removeprefix("torch.") for name, p in model.named_parameters()}
    for key, _, dtype in _tsv_rows():
        if key not in IGNORED_KEYS:
            assert dtypes[map_key(key)] == dtype, key


def test_param_count_matches_openpi() -> None:
    # TSV footer: 3616757520 unique parameters, of which 263323648 are the unused expert lm_head.
    cfg = get_config("pi05")
    assert param_count(cfg) == 3616757520 - 263323648
    assert sum(math.prod(s) for s in model_shapes(cfg).values()) == param_count(cfg)


def test_cost_estimate_matches_the_measured_budget() -> None:
    """DESIGN.md: ~2.6 TFLOP of vision + prefill for 2 images + a short prompt; each step re-reads ~0.62 GB of
    bf16 expert weights plus ~113 M fp32 time-conditioning parameters (adaRMS Dense + time MLP)."""
    cfg = get_config("pi05")
    cost = estimate_call_cost(cfg, num_images=2, prefix_len=512 + 30, num_steps=10)
    assert 2.4e12 < cost.vision_flops + cost.prefill_flops < 2.9e12
    assert 0.58e9 < cost.detail["expert_weight_bytes_per_step"] < 0.66e9
    assert 110e6 * 4 < cost.detail["time_cond_bytes_per_step"] < 125e6 * 4
    assert cost.denoise_bytes == pytest.approx(10 * sum(cost.detail[k] for k in PER_STEP_BYTES))
    full = estimate_call_cost(cfg)  # untrimmed: 3 images, 968 tokens
    assert full.prefill_flops > 1.7 * cost.prefill_flops


# ------------------------------------------------------------------------------ strict loading (tiny random model)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Pi05Model]:
    torch.manual_seed(0)
    model = Pi05Model(get_config("tiny", vocab_size=256))
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_openpi_layout(model, path)
    return path, model


def _rewrite(src: Path, dst: Path, edit: dict[str, torch.Tensor | None]) -> Path:
    tensors = load_file(src)
    for key, value in edit.items():
        if value is None:
            del tensors[key]
        else:
            tensors[key] = value
    save_file(tensors, dst)
    return dst


def test_roundtrip_loads_the_saved_parameters(tiny_ckpt: tuple[Path, Pi05Model]) -> None:
    path, model = tiny_ckpt
    loaded = load_pi05(path, model.cfg, precision="fp32")
    for name, p in model.named_parameters():
        assert torch.equal(loaded.get_parameter(name), p.detach().to(torch.bfloat16).float()), name
    assert not any(p.requires_grad for p in loaded.parameters())


def test_bf16_load_keeps_selected_parameters_fp32(tiny_ckpt: tuple[Path, Pi05Model]) -> None:
    path, model = tiny_ckpt
    loaded = load_pi05(path, model.cfg, precision="bf16")
    assert loaded.llm.layers[0].attn.q_proj.weight.dtype == torch.bfloat16
    assert loaded.vision.norm.weight.dtype == torch.bfloat16
    assert loaded.vision.patch_embed.weight.dtype == torch.float32
    assert loaded.llm.norm.weight.dtype == torch.float32
    assert loaded.expert.layers[1].mlp_norm.dense.weight.dtype == torch.float32
    assert loaded.time_out.bias.dtype == torch.float32


@pytest.mark.parametrize(
    ("edit", "named", "kind"),
    [
        ({"time_mlp_out.bias": None}, "time_mlp_out.bias", "missing"),
        ({EMBED: None}, EMBED, "missing"),
        ({"paligemma_with_expert.paligemma.model.extra.weight": torch.zeros(2)}, "model.extra.weight", "unexpected"),
        (
            {"paligemma_with_expert.gemma_expert.model.layers.4.mlp.up_proj.weight": torch.zeros(128, 64)},
            "layers.4.mlp.up_proj.weight",
            "unexpected",
        ),
        ({"action_in_proj.weight": torch.zeros(64, 31)}, "action_in_proj.weight (64, 31)", "misshaped"),
        ({"time_mlp_in.weight": torch.zeros(64, 64, dtype=torch.int32)}, "time_mlp_in.weight", "misshaped"),
    ],
)
def test_broken_checkpoint_names_the_key(
    tiny_ckpt: tuple[Path, Pi05Model], tmp_path: Path, edit: dict, named: str, kind: str
) -> None:
    path, model = tiny_ckpt
    broken = _rewrite(path, tmp_path / "broken.safetensors", edit)
    with pytest.raises(CheckpointError, match=rf"1 {kind} key\(s\): .*{re.escape(named)}"):
        check_checkpoint(broken, model.cfg)
    with pytest.raises(ValueError, match=kind):  # CheckpointError is a ValueError; load_pi05 checks first
        load_pi05(broken, model.cfg)


def test_wrong_config_lists_counts(tiny_ckpt: tuple[Path, Pi05Model]) -> None:
    path, _ = tiny_ckpt
    with pytest.raises(CheckpointError) as err:
        check_checkpoint(path, get_config("tiny", vocab_size=256, depth=3))
    message = str(err.value)
    assert "unexpected key(s)" in message and "more)" in message  # layer 3 of two stacks: > 5 keys, truncated
    assert "layers.3." in message


def test_unused_expert_lm_head_is_ignored(tiny_ckpt: tuple[Path, Pi05Model], tmp_path: Path) -> None:
    path, model = tiny_ckpt
    extra = {"paligemma_with_expert.gemma_expert.lm_head.weight": torch.zeros(256, 64)}
    check_checkpoint(_rewrite(path, tmp_path / "with_lm_head.safetensors", extra), model.cfg)


# ------------------------------------------------------------------------------ layouts (reference weights)


def test_lerobot_layout_loads_the_same_parameters(tmp_path: Path) -> None:
    src = VECTORS / "model.safetensors"
    if not src.exists():
        pytest.skip(f"reference weights not found at {src}")
    cfg = get_config("tiny")
    tensors = load_file(src)
    assert EMBED in tensors and LM_EMBED not in tensors
    lerobot = {f"model.{k}": v for k, v in tensors.items()}
    lerobot[f"model.{LM_EMBED}"] = tensors[EMBED].clone()  # lerobot may carry the tied table under both names
    save_file(lerobot, tmp_path / "lerobot.safetensors")
    only_embed_tokens = {k: v for k, v in lerobot.items() if k != f"model.{EMBED}"}
    save_file(only_embed_tokens, tmp_path / "lerobot_embed_tokens.safetensors")

    reference = load_pi05(src, cfg, precision="fp32")
    for name in ("lerobot.safetensors", "lerobot_embed_tokens.safetensors"):
        other = load_pi05(tmp_path / name, cfg, precision="fp32")
        for param_name, p in reference.named_parameters():
            assert torch.equal(other.get_parameter(param_name), p), (name, param_name)
    with safe_open(str(tmp_path / "lerobot.safetensors"), "pt") as f:
        assert all(k.startswith("model.") for k in f.keys())  # noqa: SIM118
