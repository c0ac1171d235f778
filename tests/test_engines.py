"""Engines on CPU with a tiny random model: exact shortcuts are exact, compile agrees with eager, caches persist."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pi05eval.bench import libero_inputs, random_model
from pi05eval.engines import EngineSpec, build_engine, parse_engine_spec
from pi05eval.engines.compile import CompiledEngine, CompileOptions
from pi05eval.engines.fast import FastPi05, Shortcuts

SHORTCUTS = (
    "trim_prefix", "fold_time", "fuse_qkv", "fuse_gate_up", "fuse_vision_qkv", "pad_vision_mlp", "gelu_epilogue",
    "patch_gemm", "rope_table", "static_kv",
)  # fmt: skip
ALL_OFF = dict.fromkeys(SHORTCUTS, False)


@pytest.fixture(scope="module")
def fp32_model():
    torch.set_float32_matmul_precision("highest")
    return random_model("tiny", torch.device("cpu"), seed=3).set_precision("fp32")


@pytest.fixture(scope="module")
def inputs(fp32_model):
    return libero_inputs(fp32_model.cfg, batch=2, prompt_len=23, seed=5)


@pytest.mark.parametrize(
    "flags",
    [{}, ALL_OFF, *({**ALL_OFF, name: True} for name in ALL_OFF), {"sdpa_prefix": True}],
    ids=["all", "none", *(f"only_{n}" for n in ALL_OFF), "sdpa_prefix"],
)
def test_each_exact_shortcut_keeps_fp32_actions(fp32_model, inputs, flags) -> None:
    ref = fp32_model.sample_actions(*inputs, num_steps=3)
    out = FastPi05(fp32_model, 3, Shortcuts(**flags)).sample(*inputs)
    assert (out - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("fuse_vision_qkv", [True, False])
def test_padded_vision_mlp_keeps_fp32_actions(fuse_vision_qkv) -> None:
    """An MLP hidden size of 200 is padded to 256 with zeros: same actions as the unpadded fast path and the model."""
    model = random_model("tiny", torch.device("cpu"), seed=4, overrides={"vision_mlp_dim": 200}).set_precision("fp32")
    inputs = libero_inputs(model.cfg, batch=1, prompt_len=17, seed=2)
    fast = FastPi05(model, 2, Shortcuts(fuse_vision_qkv=fuse_vision_qkv))
    assert fast.siglip.mlp is not None and fast.siglip.mlp[0][0].shape == (256, model.cfg.vision_width)
    plain = FastPi05(model, 2, Shortcuts(fuse_vision_qkv=fuse_vision_qkv, pad_vision_mlp=False))
    assert plain.siglip.mlp[0][0].shape == (200, model.cfg.vision_width)  # gelu_epilogue's unpadded weights
    ref = model.sample_actions(*inputs, num_steps=2)
    for f in (fast, plain):
        assert (f.sample(*inputs) - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("rope_table", [True, False])
def test_leading_masked_image_slot_keeps_fp32_actions(fp32_model, inputs, rope_table) -> None:
    """Element 0's first camera is masked but kept (element 1 uses it): its tokens sit at position -1, which the RoPE
    table clamps; nothing valid reads them."""
    images, image_masks, tokens, token_mask, noise = inputs
    image_masks = image_masks.clone()
    image_masks[0, 0] = False
    call = (images, image_masks, tokens, token_mask, noise)
    ref = fp32_model.sample_actions(*call, num_steps=2)
    out = FastPi05(fp32_model, 2, Shortcuts(rope_table=rope_table)).sample(*call)
    assert (out - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("flags", [{}, {"sdpa_prefix": True}], ids=["matmul", "sdpa_prefix"])
def test_pad_tokens_inside_a_bucket_change_nothing(fp32_model, inputs, flags) -> None:
    """23 valid tokens run in the 32 bucket (9 pads kept) and, with tiny buckets, in the full 200 one."""
    ref = fp32_model.sample_actions(*inputs, num_steps=2)
    for buckets in [(32, 64), (8,)]:  # (8,): longer than the largest bucket → the model's max length
        engine = CompiledEngine(
            fp32_model,
            2,
            Shortcuts(**flags),
            CompileOptions(buckets=buckets, compile=False),
            batch_size=2,
            precision="fp32",
        )
        out = engine.sample_actions(*inputs)
        assert list(engine.graphs) == [(buckets[0] if buckets[0] >= 23 else 200, (0, 1))]
        assert torch.isfinite(out).all() and (out - ref).abs().max() <= 1e-5


def test_engine_refuses_calls_it_was_not_built_for(fp32_model, inputs) -> None:
    engine = CompiledEngine(fp32_model, 2, options=CompileOptions(compile=False), batch_size=2)
    with pytest.raises(ValueError, match="built for 2 steps"):
        engine.sample_actions(*inputs, num_steps=5)
    with pytest.raises(ValueError, match="built for batch 2"):
        engine.sample_actions(*(x[:1] for x in inputs))


def test_engine_specs_parse_and_reject_unknown_options() -> None:
    spec = parse_engine_spec("compile:-trim_prefix,fold_time,-cuda_graph,mode=default")
    assert spec == EngineSpec(
        "compile", {"trim_prefix": False, "fold_time": True}, {"cuda_graph": False, "mode": "default"}
    )
    assert spec.label == "compile:-trim_prefix,fold_time,cuda_graph=False,mode=default"
    with pytest.raises(ValueError, match="unknown engine option 'warp_speed'"):
        parse_engine_spec("compile:warp_speed")
    with pytest.raises(ValueError, match="choices: eager, compile, tensorrt"):
        parse_engine_spec("onnx")
    # each engine takes its own options
    assert parse_engine_spec("tensorrt:-trim_prefix,optimization_level=5").options == {"optimization_level": 5}
    # values take their option's type: a written "false" switches off, it is not a true string
    typed = parse_engine_spec("compile:triton_denoise=false,buckets=32/64,cache_dir=none,mode=default").options
    assert typed == {"triton_denoise": False, "buckets": (32, 64), "cache_dir": None, "mode": "default"}
    with pytest.raises(ValueError, match=r"engine option triton_denoise='maybe': expected bool"):
        parse_engine_spec("compile:triton_denoise=maybe")
    with pytest.raises(ValueError, match=r"engine option buckets='32/x': expected tuple\[int, \.\.\.\]"):
        parse_engine_spec("compile:buckets=32/x")
    with pytest.raises(ValueError, match="unknown engine option 'mode=default'"):
        parse_engine_spec("tensorrt:mode=default")


def test_eager_engine_is_the_model(fp32_model, inputs) -> None:
    engine = build_engine(EngineSpec("eager"), fp32_model, 3)
    assert torch.equal(engine.sample_actions(*inputs), fp32_model.sample_actions(*inputs, num_steps=3))


def test_compiled_engine_matches_eager_and_its_cache_serves_a_second_process(tmp_path: Path) -> None:
    """Real inductor compile (CPU) in two fresh processes sharing only our cache file."""
    probe = Path(__file__).with_name("compile_probe.py")
    runs = []
    for i in range(2):
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor{i}")}  # no shared inductor cache
        proc = subprocess.run(
            [sys.executable, str(probe), str(tmp_path / "cache")], env=env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    cold, warm = runs
    for r in runs:  # bf16 rounding: eager bf16 vs fp32 differ by ~5e-3 on actions of scale ~3
        assert r["max_abs_diff"] <= 2e-2 * max(1.0, r["ref_scale"])
    assert not cold["cache_loaded"] and cold["fx_misses"] > 0 and cold["fx_hits"] == 0
    # both buckets come from the cache files (one file per bucket: a single file saved twice served only the last)
    assert warm["cache_loaded"] and warm["fx_hits"] > 0 and warm["fx_misses"] == 0
    for r in runs:  # vision, prefill, denoise step compiled once; a second bucket adds prefill and denoise only,
        # whatever the caller's grad mode (no recompiles under inference mode)
        assert r["graphs_one_bucket"] == 3 and r["graphs_two_buckets"] == 5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graph_engine_host_inputs_back_to_back_match_device_inputs() -> None:
    """Host inputs copied into the graphs' static buffers, calls issued without a sync in between, then device
    inputs: each call gives its own inputs' actions."""
    model = random_model("tiny", torch.device("cuda"), seed=3).set_precision("fp32")
    engine = CompiledEngine(model, 2, options=CompileOptions(compile=False), batch_size=1, precision="fp32")
    first, second = (libero_inputs(model.cfg, batch=1, prompt_len=n, seed=s) for n, s in ((23, 5), (17, 6)))
    refs = [FastPi05(model, 2).sample(*(x.cuda() for x in inp)) for inp in (first, second)]
    outs = [engine.sample_actions(*inp).clone() for inp in (first, second, first)]  # one bucket, one buffer set
    outs.append(engine.sample_actions(*(x.cuda() for x in second)).clone())
    assert len(engine.graphs) == 1
    for out, ref in zip(outs, [refs[0], refs[1], refs[0], refs[1]], strict=True):
        assert (out - ref).abs().max() <= 1e-4
    assert (refs[0] - refs[1]).abs().max() > 1e-2  # the two calls' inputs do differ


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("pad", [True, False])
def test_gelu_epilogue_matches_separate_gelu_on_cuda(pad) -> None:
    """fc1 + bias + tanh-GELU in cuBLASLt's epilogue: the vision tokens of the separate-GELU path (fp32)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = random_model("tiny", torch.device("cuda"), seed=4, overrides={"vision_mlp_dim": 200}).set_precision("fp32")
    images = libero_inputs(model.cfg, batch=1, prompt_len=17, seed=2)[0][:, :2].cuda()
    fused, plain = (FastPi05(model, 2, Shortcuts(pad_vision_mlp=pad, gelu_epilogue=on)) for on in (True, False))
    ref = model.embed_images(images)
    for fast in (fused, plain):
        assert (fast.vision(images) - ref).abs().max() <= 1e-4


def test_multi_kernel_needs_the_default_mode() -> None:
    assert CompileOptions(multi_kernel=True).mode == "default"
    with pytest.raises(ValueError, match="multi_kernel needs mode='default', not 'max-autotune'"):
        CompileOptions(multi_kernel=True, mode="max-autotune")


def test_wide_rows_is_keyed_apart_and_scoped_to_the_build(fp32_model) -> None:
    from torch._inductor.virtualized import V

    from pi05eval.engines.wide_rows import WideRowChoices, one_pass_rows

    keys = {
        wide: CompiledEngine(fp32_model, 2, options=CompileOptions(compile=False, wide_rows=wide)).key
        for wide in (False, True)
    }
    assert keys[False] != keys[True]  # a cache file of one setting never serves the other
    before = type(V.choices)
    with one_pass_rows():
        assert isinstance(V.choices, WideRowChoices)
    assert type(V.choices) is before and before is not WideRowChoices


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("width", [1152, 2048])
def test_wide_rows_compile_a_norm_as_one_pass_with_the_same_values(width) -> None:
    """Residual add + LayerNorm at SigLIP's / Gemma's widths: a looped reduction by default, one pass (inductor's
    `triton_per_` kernels) under `one_pass_rows`, both within fp32 rounding of eager."""
    from contextlib import nullcontext

    import torch.nn.functional as F
    from torch._inductor.utils import run_and_get_code

    from pi05eval.engines.wide_rows import one_pass_rows

    gen = torch.Generator(device="cuda").manual_seed(0)
    x, r = (torch.randn(544, width, device="cuda", generator=gen) for _ in range(2))
    w, b = (torch.randn(width, device="cuda", generator=gen) for _ in range(2))

    def norm(x, r, w, b):
        return F.layer_norm(x + r, (width,), w, b, eps=1e-6)

    ref = norm(x, r, w, b)
    for wide in (False, True):
        torch._dynamo.reset()
        with one_pass_rows() if wide else nullcontext(), torch._inductor.config.patch(fx_graph_cache=False):
            out, code = run_and_get_code(torch.compile(norm, dynamic=False), x, r, w, b)
        source = "\n".join(code)
        assert ("triton_per_" in source) == wide and ("triton_red_" in source) != wide
        assert (out - ref).abs().max() <= 1e-4


def test_an_engine_with_wide_rows_compiles_its_own_stages(tmp_path) -> None:
    """Dynamo serves a compiled function to every engine whose inputs pass its guards, which do not cover the inductor
    settings around the call: a wide_rows engine built after a plain one in the same process reused the plain one's
    stages (an A/B on an H100 measured the two as one). Its stages compile apart; a second plain engine reuses."""
    from torch._dynamo.utils import counters

    model = random_model("tiny", torch.device("cpu"), overrides={"depth": 1, "vision_depth": 1, "vocab_size": 512})
    torch._dynamo.reset()
    graphs = []
    for wide in (False, True, False):
        engine = CompiledEngine(
            model.set_precision("fp32"), 2, options=CompileOptions(wide_rows=wide, cache_dir=str(tmp_path))
        )
        engine.prepare([12])
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[1] == 2 * graphs[0] and graphs[2] == graphs[1], graphs
