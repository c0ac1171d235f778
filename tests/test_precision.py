"""Precision plans: parsing and up-front refusals, real low-precision kernels against independent math, ModelOpt
calibration turned into real kernels, fused projections, and every preset composing into a valid plan."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import CONF_DIR, compose
from omegaconf import OmegaConf

from pi05eval.bench import libero_inputs, random_model
from pi05eval.engines.fast import FastPi05, Shortcuts
from pi05eval.precision.fidelity import agreement
from pi05eval.precision.linear import (
    E2M1_GRID,
    Fp8Linear,
    Int8Linear,
    W4A16Linear,
    fuse_linears,
    nvfp4_round,
)
from pi05eval.precision.plan import COMPONENTS, FORMATS, PrecisionError, PrecisionPlan, check_hardware
from pi05eval.precision.quantize import apply_plan, check_engine, component_linears

PRESETS = sorted(p.stem for p in (CONF_DIR / "policy" / "precision").glob("*.yaml"))


# ------------------------------------------------------------------------------------------------ plans


def test_plan_parses_nested_and_dotted_components_and_labels_the_difference() -> None:
    plan = PrecisionPlan.parse({"prefix": {"mlp": "fp8"}, "expert.attn": "w4a16", "simulate": True})
    assert plan.formats["prefix.mlp"] == "fp8" and plan.formats["expert.attn"] == "w4a16"
    assert plan.formats["vision"] == "bf16" and plan.formats["heads"] == "fp32"  # openpi keeps heads fp32
    assert plan.quantized == {"prefix.mlp": "fp8", "expert.attn": "w4a16"}
    assert plan.label == "bf16+prefix.mlp=fp8,expert.attn=w4a16+sim"
    assert PrecisionPlan.parse("bf16").is_exact and PrecisionPlan.parse("fp32").formats["vision"] == "fp32"
    assert not plan.is_exact


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"prefix": {"mlp": "fp9"}}, "unknown format 'fp9' for precision.prefix.mlp; choices: " + ", ".join(FORMATS)),
        ({"decoder": "fp8"}, "unknown precision component 'decoder'; components: " + ", ".join(COMPONENTS)),
        ("fp8", "as a single word must be one of bf16, fp32"),
        ({"compute": "fp16"}, "unknown precision.compute 'fp16'"),
        ({"kv_cache": "int8"}, "unknown format 'int8' for precision.kv_cache"),
        ({"calibration": {"num_ob": 3}}, "unknown calibration keys"),
    ],
)
def test_bad_plans_are_refused_listing_the_choices(spec, message: str) -> None:
    with pytest.raises(PrecisionError, match=message.replace("(", r"\(").replace("+", r"\+")):
        PrecisionPlan.parse(spec)


def test_hardware_is_checked_up_front_unless_simulated() -> None:
    fp8 = PrecisionPlan.parse({"expert": {"mlp": "fp8"}})
    with pytest.raises(PrecisionError, match=r"precision.expert.mlp=fp8 needs compute capability ≥ 8.9.*8.0.*simulate"):
        check_hardware(fp8, (8, 0))
    check_hardware(fp8, (9, 0))
    check_hardware(fp8, None)  # torch's CPU kernels are real (tests run them)
    nvfp4 = PrecisionPlan.parse({"prefix": {"mlp": "nvfp4"}})
    with pytest.raises(PrecisionError, match=r"≥ 10\.0"):
        check_hardware(nvfp4, (9, 0))
    check_hardware(PrecisionPlan.parse({"prefix": {"mlp": "nvfp4"}, "simulate": True}), (9, 0))


@pytest.mark.parametrize(
    ("spec", "engine", "message"),
    [
        ({"expert": {"mlp": "nvfp4"}}, "compile", "engine=compile cannot run precision.expert.mlp=nvfp4: torch has"),
        ({"kv_cache": "fp8"}, "compile", "precision.kv_cache=fp8 is not implemented"),
        ({"prefix": {"mlp": "fp8"}, "simulate": True}, "tensorrt", "simulate=true runs ModelOpt fake quantization"),
        ({"prefix": {"mlp": "int8", "attn": "fp8"}}, "compile", "int8 .SmoothQuant. calibrates with its own"),
    ],
)
def test_plans_an_engine_cannot_run_say_which_component_and_why(spec, engine: str, message: str) -> None:
    with pytest.raises(PrecisionError, match=message):
        check_engine(PrecisionPlan.parse(spec), engine)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_precision_preset_composes_into_a_valid_plan(preset: str) -> None:
    cfg = compose(["policy=eager_bf16", f"policy/precision={preset}", "suite=libero_spatial"])
    spec = OmegaConf.to_container(cfg.policy.precision, resolve=True)
    plan = PrecisionPlan.parse(spec)
    assert plan.calibration.suite["name"] == "libero_spatial"  # calibration follows the run's suite
    assert preset in ("bf16", "fp32") or not plan.is_exact


def test_one_component_can_be_changed_on_the_command_line() -> None:
    cfg = compose(["policy=compile_bf16", "policy.precision.prefix.mlp=fp8"])
    plan = PrecisionPlan.parse(OmegaConf.to_container(cfg.policy.precision, resolve=True))
    assert plan.quantized == {"prefix.mlp": "fp8"}


# ------------------------------------------------------------------------------------------------ real kernels


def _fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale


def test_fp8_linear_computes_the_quantized_product() -> None:
    torch.manual_seed(0)
    w, x = torch.randn(48, 64), torch.randn(10, 64)
    layer = Fp8Linear(w, None, input_amax=x.abs().max())
    w_scale = w.abs().amax(dim=1, keepdim=True) / 448
    expected = _fp8(x, x.abs().max() / 448) @ _fp8(w, w_scale).t()
    assert torch.allclose(layer(x), expected, atol=1e-4, rtol=1e-4)
    assert (layer(x) - x @ w.t()).abs().max() > 1e-3  # and it is not the float product


def test_int8_linear_computes_the_smoothquant_product() -> None:
    torch.manual_seed(1)
    w, x, smooth = torch.randn(32, 64), torch.randn(10, 64), torch.rand(64) + 0.5
    layer = Int8Linear(w, None, input_amax=(x * smooth).abs().max(), pre_quant_scale=smooth)
    a_scale = (x * smooth).abs().max() / 127
    w_scale = w.abs().amax(dim=1, keepdim=True) / 127
    x_q = torch.round(x * smooth / a_scale).clamp(-128, 127)
    w_q = torch.round(w / w_scale).clamp(-128, 127)
    expected = (x_q @ w_q.t()) * a_scale * w_scale.t()
    assert torch.allclose(layer(x), expected, atol=1e-4, rtol=1e-5)


def test_w4a16_linear_computes_with_int4_weights_in_groups() -> None:
    torch.manual_seed(2)
    w, x = torch.randn(64, 256), torch.randn(10, 256)
    layer = W4A16Linear(w, None)
    groups = w.view(64, 2, 128)
    scale = (groups.abs().amax(-1, keepdim=True) / 7).to(torch.bfloat16).float()
    deq = (torch.round(groups / scale).clamp(-8, 7) * scale).view(64, 256)
    assert len(torch.unique(torch.round(groups / scale))) <= 16  # really 4-bit
    assert torch.allclose(layer.dequantized(), deq, atol=1e-2)
    expected = x.bfloat16().float() @ deq.t()
    assert torch.allclose(layer(x), expected, atol=0.05, rtol=1e-2)


def test_nvfp4_rounding_lands_on_the_e2m1_grid_per_block() -> None:
    torch.manual_seed(3)
    x = torch.randn(4, 32) * 3
    y = nvfp4_round(x)
    for block in range(2):
        xb, yb = x[:, 16 * block : 16 * (block + 1)], y[:, 16 * block : 16 * (block + 1)]
        for row in range(4):
            scale = yb[row].abs().max() / 6  # the block's largest value lands on ±6 × its scale
            ratios = (yb[row] / scale).abs()
            grid = torch.tensor(E2M1_GRID)
            assert torch.all((ratios[:, None] - grid).abs().min(dim=1).values < 1e-5), ratios
            assert abs(scale / (xb[row].abs().max() / 6) - 1) < 0.07  # an E4M3-rounded block scale
    assert (y - x).abs().max() < x.abs().max() / 6


def test_fp8_projections_fuse_into_one_gemm_with_the_same_result() -> None:
    torch.manual_seed(4)
    x = torch.randn(10, 64)
    parts = [Fp8Linear(torch.randn(n, 64), None, x.abs().max()) for n in (32, 16, 16)]
    fused = fuse_linears(parts)
    assert isinstance(fused, Fp8Linear)
    assert torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))


def test_agreement_metrics() -> None:
    ref = [torch.ones(10, 7).numpy(), torch.arange(70.0).view(10, 7).numpy()]
    same = agreement(ref, ref)
    assert same["cosine"] == pytest.approx(1.0) and same["max_abs"] == 0 and same["nmse"] == 0
    off = agreement(ref, [r + 0.5 for r in ref])
    assert off["max_abs"] == pytest.approx(0.5) and off["nmse"] > 0 and off["cosine"] < 1


# ------------------------------------------------------------------------------------------------ ModelOpt → real


@pytest.fixture(scope="module")
def tiny():
    torch.set_float32_matmul_precision("highest")
    model = random_model("tiny", torch.device("cpu"), seed=5).set_precision("fp32")
    calls = [libero_inputs(model.cfg, 1, 12, seed=s) for s in range(3)]
    return model, calls


def test_every_linear_layer_belongs_to_exactly_one_component(tiny) -> None:
    model, _ = tiny
    names = component_linears(model)
    total = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert sum(len(v) for v in names.values()) == total
    assert all(names[c] for c in ("vision", "prefix.attn", "prefix.mlp", "expert.attn", "expert.mlp", "heads"))


@pytest.mark.parametrize(("fmt", "tol"), [("fp8", 5e-3), ("int8", 5e-3)])
def test_real_kernels_reproduce_modelopts_calibrated_fake_quantization(tiny, fmt: str, tol: float, tmp_path) -> None:
    pytest.importorskip("modelopt")
    model, calls = tiny
    spec = {"compute": "fp32", "prefix": {"mlp": fmt, "attn": fmt}, "expert": {"mlp": fmt}}
    plan = PrecisionPlan.parse(spec)
    ran = []

    def loop(m) -> None:
        ran.append(True)
        for c in calls[:2]:
            m.sample_actions(*c, num_steps=2)

    cache = tmp_path / "scales.pt"
    with torch.no_grad():
        reference = model.sample_actions(*calls[2], num_steps=2)
        q = apply_plan(copy.deepcopy(model), plan, loop, scales_cache=cache)
        real = q.model.sample_actions(*calls[2], num_steps=2)
        sim = apply_plan(copy.deepcopy(model), PrecisionPlan.parse({**spec, "simulate": True}), loop)
        simulated = sim.model.sample_actions(*calls[2], num_steps=2)
        # fused Q/K/V and gate/up of real layers; patch_gemm off: its fp32 summation order can tip a quantizer's tie
        fast = FastPi05(q.model, 2, Shortcuts(patch_gemm=False)).sample(*calls[2])
        # a second process: the scales come from the cache, no calibration runs
        ran.clear()
        again = apply_plan(copy.deepcopy(model), plan, None, scales_cache=cache)
        assert again.scales_loaded and not ran
        assert torch.equal(again.model.sample_actions(*calls[2], num_steps=2), real)
    assert set(q.describe()["layers"]) == {fmt} and not q.scales_loaded
    # the real kernels compute what ModelOpt simulates, up to values on a rounding tie (x / s vs x · 1/s)
    off_sim, off_ref = (real - simulated).abs().max(), (real - reference).abs().max()
    assert off_sim < tol and off_ref > 5 * off_sim, (off_sim, off_ref)
    assert (fast - real).abs().max() < 1e-4


def test_calibration_frames_are_recorded_by_the_command_line(tmp_path) -> None:
    """`python -m pi05eval.precision.calibration` in a fresh process (it once crashed there: the rendering setup
    imported Triton after LIBERO had opened Mesa's GL library): one observation of task 0's last initial state."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import REPO

    from pi05eval.precision.calibration import load

    out = tmp_path / "frames.npz"
    cmd = [sys.executable, "-m", "pi05eval.precision.calibration", "--tasks", "0", "--count", "1", "--out", str(out)]
    env = {**os.environ, "MUJOCO_GL": "osmesa", "PYOPENGL_PLATFORM": "osmesa"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    frames = load(Path(out))
    (obs,) = frames.observations
    assert obs.image.shape == obs.wrist_image.shape == (224, 224, 3) and str(obs.image.dtype) == "uint8"
    assert obs.image.std() > 10 and obs.prompt.startswith("pick up the black bowl")  # a rendered scene, task 0
    assert frames.meta["init_states"] == {"libero_spatial/0": [49]}
