"""engine=tensorrt on CPU without TensorRT: the early missing-backend error, and everything before the TensorRT build
(the exported stage programs, plain and ModelOpt FP8 fake-quant, against FastPi05; the cache key)."""

from __future__ import annotations

import collections
import copy
import importlib.util
import time
import types
from pathlib import Path

import pytest
import torch

from pi05eval.bench import libero_inputs, random_model
from pi05eval.engines import EngineSpec, build_engine
from pi05eval.engines.export import (
    enabled_precisions_for,
    engine_shortcuts,
    export_stages,
    modulation_table,
    quant_formats,
    quantizers,
    stage_inputs,
    weights_fingerprint,
)
from pi05eval.engines.fast import FastPi05, Shortcuts
from pi05eval.engines.tensorrt import (
    MissingBackendError,
    TensorRTEngine,
    TensorRTOptions,
    cache_key,
    check_capability,
    compile_settings,
)

STEPS, BUCKET = 3, 32
QUANT_OP = "tensorrt.quantize_op.default"  # ModelOpt's fused quantize + dequantize, in TensorRT's op namespace
TRT_RUNNABLE = importlib.util.find_spec("torch_tensorrt") is not None and torch.cuda.is_available()


@pytest.fixture(scope="module")
def fp32_model():
    torch.set_float32_matmul_precision("highest")
    return random_model("tiny", torch.device("cpu"), seed=3).set_precision("fp32")


@pytest.fixture(scope="module")
def trimmed(fp32_model):
    """A batch of 2 LIBERO-shaped calls (2 of 3 image slots, a 23-token prompt) trimmed to the 32 bucket."""
    images, masks, tokens, token_mask, noise = libero_inputs(fp32_model.cfg, batch=2, prompt_len=23, seed=5)
    fast = FastPi05(fp32_model, STEPS)
    return (*fast.select_inputs(images, masks, tokens, token_mask, BUCKET), noise)


def check_stages(fast: FastPi05, trimmed) -> dict[str, torch.fx.GraphModule]:
    """Export the stages and compare each program (and the step program looped) with FastPi05's eager stages."""
    images, img_mask, tokens, token_mask, noise = trimmed
    inputs = stage_inputs(fast, *trimmed)
    programs = export_stages(fast, inputs)
    assert set(programs) == {"vision", "prefill", "denoise"}
    with torch.no_grad():
        img_tokens = fast.vision(images)
        ks, vs, key_mask = fast.prefill(img_tokens, img_mask, tokens, token_mask)
        ref = fast.denoise(noise, ks, vs, key_mask)
        assert img_tokens.shape[1] == 2 * fast.cfg.num_patches and ks.shape[3] == 2 * fast.cfg.num_patches + BUCKET
        assert (programs["vision"].module()(images) - img_tokens).abs().max() <= 1e-5
        out = programs["prefill"].module()(img_tokens, img_mask, tokens, token_mask)
        assert (out[0] - ks).abs().max() <= 1e-5 and (out[1] - vs).abs().max() <= 1e-5
        assert torch.equal(out[2], key_mask)
        step, x = programs["denoise"].module(), noise.float()
        for mods in modulation_table(fast):
            x = step(x, mods, ks, vs, key_mask)
        assert (x - ref).abs().max() <= 1e-5 and ref.abs().max() > 0.1
    return {name: p.graph for name, p in programs.items()}


def targets(graph) -> collections.Counter:
    return collections.Counter(str(n.target) for n in graph.nodes if n.op == "call_function")


@pytest.mark.skipif(TRT_RUNNABLE, reason="torch-tensorrt and a GPU are available here")
def test_missing_tensorrt_fails_first_with_what_to_do(fp32_model, tmp_path: Path) -> None:
    t0 = time.perf_counter()
    with pytest.raises(MissingBackendError) as err:  # before touching the model: None would fail any other work
        TensorRTEngine(None, STEPS)
    spec = EngineSpec("tensorrt", options={"cache_dir": str(tmp_path), "buckets": "32/64"})
    with pytest.raises(MissingBackendError):
        build_engine(spec, fp32_model, STEPS, precision="fp32")
    assert time.perf_counter() - t0 < 2.0 and not any(tmp_path.iterdir())
    msg = str(err.value)
    if importlib.util.find_spec("torch_tensorrt") is None:
        assert 'pip install "pi05eval[tensorrt]"' in msg and "policy=compile_bf16" in msg
    else:
        assert "TensorRT needs an NVIDIA GPU" in msg


def test_exported_stages_reproduce_the_fast_path(fp32_model, trimmed) -> None:
    fast = FastPi05(fp32_model, STEPS)
    graphs = check_stages(fast, trimmed)
    assert not any("quantize" in t for g in graphs.values() for t in targets(g))
    programs = export_stages(fast, stage_inputs(fast, *trimmed), ["vision", "denoise"])
    held = {
        k: sum(t.numel() for t in p.constants.values()) + sum(t.numel() for t in p.state_dict.values())
        for k, p in programs.items()
    }  # each program holds only the weights it reads
    m = fp32_model
    n_params = {k: sum(p.numel() for p in mod.parameters()) for k, mod in m.named_children()}
    assert held["vision"] == n_params["vision"] + n_params["projector"]
    assert held["denoise"] < n_params["expert"] + n_params["action_in"] + n_params["action_out"]


def test_exported_stages_without_fold_time_and_fusion(fp32_model, trimmed) -> None:
    check_stages(FastPi05(fp32_model, STEPS, Shortcuts(fold_time=False, fuse_qkv=False, fuse_gate_up=False)), trimmed)


def test_engine_builds_runs_and_reloads_with_a_stand_in_backend(fp32_model, monkeypatch, tmp_path: Path) -> None:
    """The engine around TensorRT, with a stand-in: compile = the exported program, save = `torch.export.save`."""
    import pi05eval.engines.tensorrt as engine_module

    calls: list[dict] = []

    def compile(exported, arg_inputs, **settings):
        calls.append(settings)
        module = exported.module()
        module.exported = exported
        return module

    def save(module, path, output_format, arg_inputs):
        assert output_format == "exported_program" and len(arg_inputs) == len(module.exported.example_inputs[0])
        torch.export.save(module.exported, path)

    stand_in = types.SimpleNamespace(__version__="0", dynamo=types.SimpleNamespace(compile=compile), save=save)
    monkeypatch.setattr(engine_module, "require_tensorrt", lambda: stand_in)
    monkeypatch.setattr(engine_module, "require_cuda_model", lambda m: m.action_in.weight.device)
    inputs = libero_inputs(fp32_model.cfg, batch=1, prompt_len=23, seed=5)
    ref = fp32_model.sample_actions(*inputs, num_steps=STEPS)
    opts = TensorRTOptions(buckets=(32, 64), cache_dir=str(tmp_path))
    cold = TensorRTEngine(fp32_model, STEPS, options=opts, precision="fp32")
    assert cold.prepare([23]) > 0 and not cold.cache_loaded and len(calls) == 3
    assert calls[0] == {**compile_settings((), opts), "device": torch.device("cpu")}
    assert len(list(tmp_path.glob("*.pt2"))) == 3
    assert (cold.sample_actions(*inputs) - ref).abs().max() <= 1e-5 and cold.stage_ms() == {}
    warm = TensorRTEngine(fp32_model, STEPS, options=opts, precision="fp32")
    assert (warm.sample_actions(*inputs) - ref).abs().max() <= 1e-5
    assert warm.cache_loaded and len(calls) == 3 and list(warm.built) == [(32, (0, 1))]
    longer = libero_inputs(fp32_model.cfg, batch=1, prompt_len=40, seed=6)  # bucket 64: the vision engine is shared
    assert (warm.sample_actions(*longer) - fp32_model.sample_actions(*longer, num_steps=STEPS)).abs().max() <= 1e-5
    assert len(calls) == 5 and not warm.cache_loaded and len(list(tmp_path.glob("*.pt2"))) == 5
    with pytest.raises(ValueError, match="built for 3 steps"):
        warm.sample_actions(*inputs, num_steps=5)


def fp8_llm_expert_config() -> dict:
    """FP8 (E4M3, per-tensor) weights and inputs of the prefix LLM's and the expert's linear layers only."""
    fp8 = {"num_bits": (4, 3), "axis": None}
    rules = [{"quantizer_name": "*", "enable": False}]
    for part in ("llm", "expert"):
        for q in ("weight_quantizer", "input_quantizer"):
            rules.append({"quantizer_name": f"{part}.layers.*{q}", "cfg": fp8})
    return {"quant_cfg": rules, "algorithm": "max"}


def test_fp8_fake_quant_exports_as_quantize_ops(fp32_model, trimmed) -> None:
    mtq = pytest.importorskip("modelopt.torch.quantization")
    model = copy.deepcopy(fp32_model)
    calib = libero_inputs(model.cfg, batch=2, prompt_len=23, seed=11)
    mtq.quantize(model, fp8_llm_expert_config(), lambda m: m.sample_actions(*calib, num_steps=STEPS))
    assert quant_formats(model) == {"fp8"} and torch.float8_e4m3fn in enabled_precisions_for(model)
    check_capability(quant_formats(model), (9, 0))  # H100 / H200
    with pytest.raises(MissingBackendError, match=r"fp8 needs a GPU of compute capability >= 8\.9"):
        check_capability(quant_formats(model), (8, 0))  # A100
    assert not quantizers(fp32_model) and enabled_precisions_for(fp32_model) == {torch.float32}
    assert weights_fingerprint(model) != weights_fingerprint(fp32_model)  # amax and quantizer settings count
    shortcuts = engine_shortcuts(Shortcuts(static_kv=True), model)  # fused weights would skip the quantizers
    assert not (shortcuts.fuse_qkv or shortcuts.fuse_gate_up or shortcuts.static_kv) and shortcuts.fold_time
    assert not (shortcuts.pad_vision_mlp or shortcuts.gelu_epilogue)
    plain_export = Shortcuts(gelu_epilogue=False, triton_prefix=False, triton_softmax=False)  # not TRT layers
    assert engine_shortcuts(Shortcuts(triton_prefix=True), fp32_model) == plain_export
    fast = FastPi05(model, STEPS, shortcuts)
    plain = FastPi05(fp32_model, STEPS).sample(*trimmed)
    assert (fast.sample(*trimmed) - plain).abs().max() > 1e-3  # FP8 fake quant is on: the eager reference moved
    graphs = check_stages(fast, trimmed)  # exported under export_torch_mode == the fake-quant model
    for name, graph in graphs.items():  # every quantized linear reads Q/DQ'd input and weight
        linears = [n for n in graph.nodes if n.target == torch.ops.aten.linear.default]
        qdq = [n for n in linears if all(str(a.target) == QUANT_OP for a in n.args[:2])]
        assert targets(graph)[QUANT_OP] == 2 * len(qdq), name
        unquantized = {"vision": len(linears), "prefill": 0, "denoise": 2}[name]  # denoise: action_in / action_out
        assert len(linears) - len(qdq) == unquantized and (name == "vision" or qdq), name
    assert not any("float8" in t for g in graphs.values() for t in targets(g))  # no aten fp8 casts: Q/DQ ops only


def test_cache_key_tracks_what_the_engine_embeds(fp32_model) -> None:
    base = {
        "model_config": fp32_model.cfg,
        "precision": "bf16",
        "num_steps": 10,
        "shortcuts": Shortcuts(),
        "batch": 1,
        "bucket": 64,
        "images": 2,
        "stage": "prefill",
        "gpu": "NVIDIA H200",
        "versions": ("2.13.0", "2.13.0"),
        "weights": "abc",
    }
    key = cache_key(**base)
    assert key == cache_key(**base, options=TensorRTOptions(cache_dir="/elsewhere", buckets=(8,)))
    changes = {"precision": "fp8", "bucket": 128, "num_steps": 5, "stage": "denoise", "weights": "abd", "batch": 2}
    for field, value in changes.items():
        assert cache_key(**{**base, field: value}) != key, field
    assert cache_key(**base, options=TensorRTOptions(optimization_level=5)) != key
    assert cache_key(**base, enabled_precisions={torch.float8_e4m3fn}) == key  # explicit typing: the graph decides
    weak = {"options": TensorRTOptions(use_explicit_typing=False), **base}
    assert cache_key(**weak, enabled_precisions=[torch.half]) != cache_key(**weak, enabled_precisions=[torch.float])
    other = copy.deepcopy(fp32_model)  # engines embed weights: another checkpoint must not load these files
    assert weights_fingerprint(other) == weights_fingerprint(fp32_model)
    with torch.no_grad():
        other.expert.layers[1].mlp.up_proj.weight[3, 5] += 1e-3
    assert weights_fingerprint(other) != weights_fingerprint(fp32_model)


def test_options_parse_and_compile_settings() -> None:
    opts = TensorRTOptions.from_spec({"buckets": "32/64", "optimization_level": "5", "use_explicit_typing": "false"})
    assert opts.buckets == (32, 64) and opts.optimization_level == 5 and not opts.use_explicit_typing
    assert compile_settings({torch.float32, torch.bfloat16}, opts)["enabled_precisions"] == {
        torch.float32,
        torch.bfloat16,
    }
    assert "enabled_precisions" not in compile_settings({torch.float8_e4m3fn}, TensorRTOptions())
    with pytest.raises(ValueError, match="unknown tensorrt engine option 'mode'"):
        TensorRTOptions.from_spec({"mode": "max-autotune"})
