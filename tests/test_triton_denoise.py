"""`TritonDenoise.update` matches `FastPi05.update` (fp32, tiny random models).

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, which must be set before Triton itself is
imported: this module sets it, or reruns its kernel tests in a fresh process if Triton came in earlier). The
interpreter has no bf16 scalars, hence fp32 models. Tile sizes are shrunk so every code path runs: several key
blocks (one fully masked), several attention row blocks and output slices, split-K with the last-arriving
program's epilogue, static_kv, batch 2.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton is not installed (pip install triton)", allow_module_level=True)

import triton_interpreter as interp

DEVICE = interp.DEVICE
_SET_HERE = interp.turn_on()

from pi05eval.bench import random_model  # noqa: E402
from pi05eval.engines.fast import FastPi05, Shortcuts  # noqa: E402
from pi05eval.engines.triton_denoise import TritonDenoise  # noqa: E402
from pi05eval.kernels import ExpertKernelConfig  # noqa: E402
from pi05eval.kernels.expert_triton import norm_gemm_kernel  # noqa: E402

interp.turn_off(_SET_HERE)
IN_PROCESS = interp.interpreted(norm_gemm_kernel)  # else: Triton came in earlier without it, rerun in a fresh process


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch):
    if DEVICE.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _inputs(model, batch: int, prefix_len: int, static_kv: bool, seed: int):
    """Prefix K/V [depth, B, KV, P (+ H), hd] with ~30% masked keys and the first 16 all masked; RoPE tables; x."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    h = cfg.action_horizon
    shape = (cfg.depth, batch, cfg.num_kv_heads, prefix_len + (h if static_kv else 0), cfg.head_dim)
    ks, vs = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    pad = torch.rand(batch, prefix_len, generator=g) > 0.3
    pad[:, :16] = False  # a whole key chunk masked
    key_mask = torch.cat([pad, pad.new_ones(batch, h)], dim=1)[:, None]
    positions = pad.sum(dim=1)[:, None] + torch.arange(h)
    cos, sin = model._rope(positions, torch.float32)
    x = torch.randn(batch, h, cfg.action_dim, generator=g)
    return [t.to(DEVICE) for t in (x, cos, sin, ks, vs, key_mask)]


@pytest.mark.parametrize(
    ("batch", "head_dim", "static_kv", "kernel_cfg"),
    [
        (1, 16, False, {"att_bs": 16, "o_split": 4, "down_split": 2, "qkv_split": 4, "gu_split": 2}),
        (
            2,
            32,
            True,
            {
                "att_bs": 16,
                "att_bm": 32,
                "att_dsplit": 2,
                "o_split": 1,
                "qkv_bn": 32,
                "gu_bn": 16,
                "gu_split": 2,
                "mod_late": True,
            },
        ),
        (1, 16, False, {"stream": True, "qkv_split": 2, "gu_bk": 16, "o_split": 2, "down_bk": 32, "swap": False}),
        (2, 32, True, {"stream": True, "gu_split": 2, "qkv_bk": 32, "down_split": 4, "o_bk": 16, "stages": 2}),
        (1, 16, False, {"prefetch": 2, "att_prefetch": 2, "prefetch_at": 1, "o_split": 2}),  # CPU: prefetch skipped
        (1, 16, False, {"tma": True, "o_split": 2, "down_split": 4, "down_bk": 16, "gu_bn": 32, "qkv_bk": 16}),
        (2, 32, True, {"tma": True, "o_split": 1, "gu_bk": 32, "down_bn": 16}),
        (1, 16, False, {"atomic_residual": True, "o_split": 4, "down_split": 2, "gu_bn": 32}),
        (2, 32, True, {"atomic_residual": True, "o_split": 1, "down_split": 4, "o_bn": 16, "att_bm": 32}),
    ],
    ids=[
        "b1",
        "b2_hd32_static_kv",
        "stream_b1",
        "stream_b2",
        "l2_prefetch",
        "tma_b1",
        "tma_b2_static_kv",
        "atomic_b1",
        "atomic_b2_static_kv",
    ],
)
def test_update_matches_fast_path(request, batch, head_dim, static_kv, kernel_cfg) -> None:
    if not IN_PROCESS:
        interp.rerun_in_fresh_process(request)
        return
    torch.set_float32_matmul_precision("highest")
    model = random_model("tiny", DEVICE, seed=3, overrides={"head_dim": head_dim}).set_precision("fp32")
    fast = FastPi05(model, 3, Shortcuts(static_kv=static_kv))
    td = TritonDenoise(fast, ExpertKernelConfig(**kernel_cfg))
    x, cos, sin, ks, vs, key_mask = _inputs(model, batch, prefix_len=37, static_kv=static_kv, seed=batch)
    ref, out = x, x
    with torch.no_grad():
        for step in range(3):
            mods = fast.mods[step]  # [2 * depth + 1, 1, 3 * De]
            ref = fast.update(ref, mods, cos, sin, ks, vs, key_mask)
            out = td.update(out, mods, cos, sin, ks, vs, key_mask)
            assert out.shape == ref.shape and out.dtype == torch.float32
            assert (out - ref).abs().max() <= 1e-4, f"step {step}: {(out - ref).abs().max():.2e}"


@pytest.mark.parametrize("flag", ["fold_time", "fuse_qkv", "fuse_gate_up", "per_batch_mods"])
def test_refuses_what_it_was_not_built_for(flag) -> None:
    model = random_model("tiny", torch.device("cpu"), seed=3).set_precision("fp32")
    if flag != "per_batch_mods":
        with pytest.raises(ValueError, match="TritonDenoise needs"):
            TritonDenoise(FastPi05(model, 2, Shortcuts(**{flag: False})))
        return
    fast = FastPi05(model, 2)
    x, cos, sin, ks, vs, key_mask = (t.cpu() for t in _inputs(model, 2, 20, False, seed=0))
    with pytest.raises(ValueError, match="shared by the batch"):
        TritonDenoise(fast).update(x, fast.mods[0].repeat(1, 2, 1), cos, sin, ks, vs, key_mask)


def test_prefetch_chunks_cover_the_weight_in_aligned_pieces() -> None:
    from pi05eval.kernels.prefetch import prefetch_args

    w = torch.empty(2560, 1024, dtype=torch.bfloat16)
    for programs, warps in [(40, 8), (64, 4), (3, 1), (2000, 8)]:
        a = prefetch_args(w, w, programs, warps)
        threads = programs * warps * 32
        chunk_bytes = a["pf_chunk"] * a["PF_ELEM"]
        assert a["PREFETCH"] and a["PF_THREADS"] == warps * 32 and a["pf_numel"] == w.numel()
        assert chunk_bytes % 16 == 0 and chunk_bytes >= 256
        assert threads * a["pf_chunk"] >= w.numel()  # every element falls in some thread's chunk
        assert chunk_bytes < max(256, -(-w.numel() * 2 // threads)) + 16  # the smallest such chunk
    off = prefetch_args(None, w, 4, 4)
    assert off["PREFETCH"] is False and off["pf_ptr"] is w
    with pytest.raises(ValueError, match="multiple of 16 bytes"):
        prefetch_args(torch.empty(7, dtype=torch.bfloat16), w, 4, 4)
    model = random_model("tiny", torch.device("cpu"), seed=3).set_precision("fp32")
    with pytest.raises(ValueError, match="stream"):
        TritonDenoise(FastPi05(model, 2), ExpertKernelConfig(stream=True, att_prefetch=1))


def test_tma_relay_puts_each_programs_chunks_in_one_box() -> None:
    from pi05eval.kernels.tma_triton import relay_tiles, tile_chunk

    w = torch.arange(64 * 96, dtype=torch.float32).view(64, 96)
    bn, split, bk, nch = 16, 2, 16, 3  # K slices of 48 columns, 3 chunks each
    relaid = relay_tiles(w, bn, split, bk)
    assert relaid.shape == (64 * 96 // bk, bk)
    for tile in range(64 // bn):
        for s in range(split):
            box = relaid[(tile * split + s) * nch * bn :][: nch * bn]  # what program (tile, s) copies
            for c in range(nch):
                cols = slice(s * 48 + c * bk, s * 48 + (c + 1) * bk)
                assert torch.equal(box[c * bn : (c + 1) * bn], w[tile * bn : (tile + 1) * bn, cols])
    assert tile_chunk(1024, 64, 64) == 256  # 4 chunks of 64 rows fill one 256 x 256 box
    assert tile_chunk(256, 64, 128) == 128
    with pytest.raises(ValueError, match="no TMA box"):
        tile_chunk(2048, 64, 256)
    model = random_model("tiny", torch.device("cpu"), seed=3).set_precision("fp32")
    with pytest.raises(ValueError, match="qkv_split = gu_split = 1"):
        TritonDenoise(FastPi05(model, 2), ExpertKernelConfig(tma=True, qkv_split=2))


@pytest.mark.parametrize(
    ("setting", "message"),
    [({"gu_split": 2}, "qkv_split = gu_split = 1"), ({"stream": True}, "not implemented"), ({"prefetch": 1}, "not")],
)
def test_atomic_residual_refuses_what_it_does_not_cover(setting, message) -> None:
    model = random_model("tiny", torch.device("cpu"), seed=3).set_precision("fp32")
    with pytest.raises(ValueError, match=message):
        TritonDenoise(FastPi05(model, 2), ExpertKernelConfig(atomic_residual=True, **setting))


def test_cuda_chain_is_refused_without_a_hopper_gpu() -> None:
    from pi05eval.kernels.chain_cuda import unavailable_reason

    assert "CUDA device" in unavailable_reason(torch.device("cpu"))
    model = random_model("tiny", torch.device("cpu"), seed=3).set_precision("fp32")
    with pytest.raises(RuntimeError, match="cannot run here: it needs a CUDA device"):
        TritonDenoise(FastPi05(model, 2), ExpertKernelConfig(cuda_chain=True))
    with pytest.raises(ValueError, match="not implemented with stream"):
        TritonDenoise(FastPi05(model, 2), ExpertKernelConfig(cuda_chain=True, stream=True))
