"""Pi05Model against openpi's reference vectors (shared/vectors/pi05_tiny_openpi), plus exactness properties of the
stages (trimmed prefix, batch independence, Euler schedule) that need no reference files."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors.torch import load_file

from pi05eval.model import Pi05Model, euler_schedule, get_config, load_pi05

REPO = Path(__file__).resolve().parents[1]
VECTORS = Path(__file__).resolve().parents[2] / "shared" / "vectors" / "pi05_tiny_openpi"


@pytest.fixture(scope="module")
def checker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_reference", REPO / "scripts" / "check_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in the script look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def vectors() -> Path:
    if not (VECTORS / "outputs.safetensors").exists():
        pytest.skip(f"openpi reference vectors not found at {VECTORS}")
    return VECTORS


@pytest.fixture(scope="module")
def report(checker: ModuleType, vectors: Path) -> tuple[int, dict[str, tuple[float, float, bool]]]:
    """Run scripts/check_reference.py's CLI once; parse its table into {tensor: (err, tol, ok)}."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = checker.main([str(vectors)])
    rows = {}
    for line in out.getvalue().splitlines():
        parts = line.rsplit(maxsplit=3)
        if len(parts) == 4 and parts[3] in ("ok", "FAIL") and parts[0] != "tensor":  # skip the header
            rows[parts[0]] = (float(parts[1]), float(parts[2]), parts[3] == "ok")
    return rc, rows


@pytest.fixture(scope="module")
def inputs(checker: ModuleType, vectors: Path) -> dict[str, torch.Tensor]:
    return checker.load_inputs(vectors)


@pytest.fixture(scope="module")
def fp32_model(vectors: Path) -> Pi05Model:
    return load_pi05(vectors / "model.safetensors", get_config("tiny"), precision="fp32")


def test_reference_vectors_all_within_tolerance(report: tuple[int, dict]) -> None:
    rc, rows = report
    failed = {name: row for name, row in rows.items() if not row[2]}
    assert not failed, f"tensors off the openpi reference: {failed}"
    assert rc == 0


@pytest.mark.parametrize(
    ("name", "tol"),
    [
        ("fp32_steps10/actions", 1e-4),
        ("fp32_steps3/actions", 1e-4),
        ("fp32_steps10/actions (stages)", 1e-4),
        ("bf16_steps10/actions", 2e-2),
        ("fp32_steps10/siglip_last_hidden_state_base", 1e-4),
        ("fp32_steps10/prefix_embs", 1e-4),
        ("fp32_steps10/prefix_layer0_out", 1e-4),
        ("fp32_steps10/prefix_out", 1e-4),
        ("fp32_steps10/kv_cache/layer3/k", 1e-4),
        ("fp32_steps10/kv_cache/layer3/v", 1e-4),
        ("fp32_steps10/step0/adarms_cond", 1e-4),
        ("fp32_steps10/step0/time_sincos", 1e-4),
        ("fp32_steps10/step0/expert_layer0_out", 1e-4),
        ("fp32_steps10/step9/v_t", 1e-4),
        ("fp32_steps10/step9/timestep", 0.0),
        ("fp32_steps3/step2/timestep", 0.0),
        ("jax/fp32_steps10/actions", 1e-4),
    ],
)
def test_reference_tensor_compared(report: tuple[int, dict], name: str, tol: float) -> None:
    """The checker really compared these tensors (none silently skipped) and they are within the brief's bars."""
    rows = report[1]
    assert name in rows, f"{name} missing from the check table"
    err, row_tol, _ = rows[name]
    assert row_tol <= tol
    assert err <= tol


def test_trimmed_prefix_gives_the_same_actions(fp32_model: Pi05Model, inputs: dict[str, torch.Tensor]) -> None:
    """Dropping the masked image and the pad tokens is exact: positions come from the mask's cumsum."""
    torch.set_float32_matmul_precision("highest")
    model, inp = fp32_model, inputs
    with torch.no_grad():
        full = model.sample_actions(num_steps=10, **inp)
        assert inp["image_masks"].tolist() == [[True, True, False]]
        n_tokens = int(inp["token_mask"].sum())
        assert inp["token_mask"][0, :n_tokens].all()  # left-aligned prompt
        embs = torch.cat(
            [model.embed_images(inp["images"][:, :2]), model.llm.embed_tokens(inp["tokens"][:, :n_tokens])], 1
        )
        cache = model.prefill(embs, torch.ones(embs.shape[:2], dtype=torch.bool))
        assert cache.k.shape[3] == 2 * 256 + n_tokens
        times, dt = euler_schedule(10)
        x = inp["noise"]
        for t in times:
            x = x + dt * model.denoise_step(x, torch.full((1,), t), cache)
    assert (x - full).abs().max().item() <= 1e-5


def test_bf16_rope_frequencies_reproduce_openpi(vectors: Path, inputs: dict[str, torch.Tensor]) -> None:
    """openpi's bf16 mode rotates with bf16-rounded RoPE frequencies; with them our bf16 prefix is bit-identical to
    openpi's, without them it is not. Bit equality needs bf16 GEMMs that round like the CPU that made the vectors:
    checked first on the SigLIP tokens, which do not involve RoPE."""
    refs = load_file(vectors / "outputs.safetensors")
    errs = {}
    for rounded in (True, False):
        cfg = get_config("tiny", rope_freqs_in_compute_dtype=rounded)
        model = load_pi05(vectors / "model.safetensors", cfg, precision="bf16")
        with torch.no_grad():
            embs, pad, att = model.embed_prefix(
                inputs["images"], inputs["image_masks"], inputs["tokens"], inputs["token_mask"]
            )
            if not torch.equal(embs.float(), refs["bf16_steps10/prefix_embs"]):
                pytest.skip("this machine's bf16 GEMMs round differently from the one that made the vectors")
            errs[rounded] = (model.prefix_hidden(embs, pad, att).float() - refs["bf16_steps10/prefix_out"]).abs().max()
    assert errs[True] == 0.0 < errs[False], errs


def test_batch_rows_are_independent() -> None:
    """Row 0 of a batch of 2 (different masks, prompts and noise) equals row 0 run alone."""
    torch.manual_seed(0)
    cfg = get_config("tiny", vocab_size=300)
    model = Pi05Model(cfg).eval()
    b = 2
    images = torch.rand(b, 3, 3, 224, 224) * 2 - 1
    image_masks = torch.tensor([[True, True, False], [True, False, True]])
    tokens = torch.randint(1, cfg.vocab_size, (b, cfg.max_token_len))
    token_mask = torch.arange(cfg.max_token_len)[None] < torch.tensor([[17], [41]])
    noise = torch.randn(b, cfg.action_horizon, cfg.action_dim)
    both = model.sample_actions(images, image_masks, tokens, token_mask, noise, num_steps=3)
    alone = model.sample_actions(images[:1], image_masks[:1], tokens[:1], token_mask[:1], noise[:1], num_steps=3)
    assert both.shape == (b, cfg.action_horizon, cfg.action_dim) and both.dtype == torch.float32
    assert (both[:1] - alone).abs().max().item() <= 1e-5
    assert (both[0] - both[1]).abs().max().item() > 1e-3  # the rows did differ


def test_euler_schedule_is_openpi_fp32_accumulation() -> None:
    # Values from the reference README (openpi's fp32 `time += dt`).
    times, dt = euler_schedule(10)
    assert times[:3] == [1.0, 0.8999999761581421, 0.7999999523162842]
    assert dt == pytest.approx(-0.1, abs=1e-8)
    assert [round(t, 7) for t in euler_schedule(3)[0]] == [1.0, 0.6666666, 0.3333333]
    for n in range(1, 65):
        ts, step = euler_schedule(n)
        assert len(ts) == n
        assert math.isclose(ts[-1] + step, 0.0, abs_tol=1e-5)
    with pytest.raises(ValueError):
        euler_schedule(0)


@pytest.mark.gpu
def test_cuda_bf16_matches_reference_without_host_sync(vectors: Path, inputs: dict) -> None:
    """On CUDA: bf16 actions within 2e-2 of openpi's, and the sampled call never synchronizes with the host."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    ref = load_file(vectors / "outputs.safetensors")["bf16_steps10/actions"]
    model = load_pi05(vectors / "model.safetensors", get_config("tiny"), precision="bf16", device="cuda")
    inp = {k: v.cuda() for k, v in inputs.items()}
    model.sample_actions(num_steps=10, **inp)  # warm-up (lazy CUDA init may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        actions = model.sample_actions(num_steps=10, **inp)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert (actions.cpu() - ref).abs().max().item() <= 2e-2
