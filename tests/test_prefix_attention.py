"""The Triton prefix attention (`triton_prefix`) and softmax (`triton_softmax`) match the eager math: each kernel alone
and inside `FastPi05`.

Without CUDA the kernel runs in Triton's interpreter (fp32: the interpreter has no bf16 scalars), which must be on when
Triton itself is imported: this module sets it, or reruns its tests in a fresh process if Triton came in earlier.
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

from pi05eval.bench import libero_inputs, random_model  # noqa: E402
from pi05eval.engines.fast import FastPi05, Shortcuts  # noqa: E402
from pi05eval.kernels.prefix_attention_triton import prefix_attention, prefix_attention_kernel  # noqa: E402
from pi05eval.kernels.softmax_triton import attention_masked_softmax  # noqa: E402
from pi05eval.model.attention import apply_rope, attention, rope_cos_sin  # noqa: E402

interp.turn_off(_SET_HERE)


@pytest.fixture(autouse=True)
def _interpreter_env(request, monkeypatch):
    if DEVICE.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    if not interp.interpreted(prefix_attention_kernel):  # Triton came in earlier without the interpreter
        interp.rerun_in_fresh_process(request)
        pytest.skip("passed in a fresh process with Triton's interpreter")


def _case(batch: int, p: int, heads: int, kv: int, hd: int, seed: int):
    """q inside a fused [q | k | v] row (strided view), K/V caches longer than P, pads inside and at the end."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, p, (heads + 2 * kv) * hd, generator=g)
    q = qkv[..., : heads * hd]
    k, v = torch.randn(batch, kv, p + 5, hd, generator=g), torch.randn(batch, kv, p + 5, hd, generator=g)
    pad = torch.rand(batch, p, generator=g) > 0.25
    pad[:, 0] = True
    pad[-1, 3:19] = False  # a masked image slot in the last batch element
    cos, sin = rope_cos_sin(torch.cumsum(pad.long(), dim=1) - 1, hd, 10000.0, torch.float32)  # [B, 1, P, hd]
    q_rot = apply_rope(q.reshape(batch, p, heads, hd).transpose(1, 2), cos, sin)  # [B, H, P, hd]
    ref = attention(q_rot, k[:, :, :p], v[:, :, :p], pad[:, None, :] & pad[:, :, None], hd**-0.5)
    dev = [t.to(DEVICE) for t in (q, k, v, pad, cos, sin)]
    return dev, q_rot.transpose(1, 2).reshape(batch, p, heads * hd).to(DEVICE), pad, ref


@pytest.mark.parametrize(
    ("batch", "p", "heads", "kv", "hd", "block_m", "block_n", "split"),
    [
        (2, 45, 4, 1, 16, 16, 16, 1),
        (1, 70, 4, 2, 32, 32, 16, 2),
        (2, 33, 2, 1, 64, 64, 16, 3),
        (2, 45, 2, 1, 16, 16, 16, 4),
    ],
)
def test_kernel_matches_eager_attention_on_valid_rows(batch, p, heads, kv, hd, block_m, block_n, split) -> None:
    """Key splits: 70 keys in 5 blocks as 3 + 2, 33 in 3 as 1 + 1 + 1, 45 in 3 with 4 asked (clamped to 3)."""
    (q, k, v, pad, cos, sin), q_rot, host_pad, ref = _case(batch, p, heads, kv, hd, seed=p)
    tiles = {"block_m": block_m, "block_n": block_n, "split": split}
    fused = prefix_attention(q, k, v, pad, hd**-0.5, cos, sin, **tiles).cpu()  # RoPE applied on load
    plain = prefix_attention(q_rot, k, v, pad, hd**-0.5, **tiles).cpu()
    for out in (fused, plain):
        assert out.shape == ref.shape and torch.isfinite(out).all()  # pad rows too
        assert (out - ref)[host_pad].abs().max() <= 1e-5


def test_kernel_rejects_head_dims_it_cannot_tile() -> None:
    q = torch.randn(1, 8, 2 * 24, device=DEVICE)
    k = torch.randn(1, 1, 8, 24, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim 24 must be a power of 2"):
        prefix_attention(q, k, k, torch.ones(1, 8, dtype=torch.bool, device=DEVICE), 0.2)


def _small_image_model():
    """The tiny model at 56-pixel images (16 patches each: a 55-token prefix with two images and the prompt), so
    that the interpreted kernels of the whole-path tests take seconds, not a minute."""
    return random_model("tiny", DEVICE, seed=3, overrides={"image_size": 56}).set_precision("fp32")


def test_triton_prefix_keeps_fp32_actions() -> None:
    """The whole fast path with the kernel: batch 2 (one image slot masked in one element), a 23-token prompt."""
    torch.set_float32_matmul_precision("highest")
    model = _small_image_model()
    inputs = [t.to(DEVICE) for t in libero_inputs(model.cfg, batch=2, prompt_len=23, seed=5)]
    ref = model.sample_actions(*inputs, num_steps=2)
    out = FastPi05(model, 2, Shortcuts(triton_prefix=True, triton_softmax=False)).sample(*inputs)
    assert (out - ref).abs().max() <= 1e-5


@pytest.mark.parametrize(("batch", "p"), [(1, 45), (2, 45), (2, 32)])
def test_masked_softmax_matches_eager_attention(batch, p) -> None:
    """The softmax kernel between the two GEMMs: all rows (pad rows get the reference's uniform average too); a row
    of 45 keys as 32 + 16 columns, of 32 as one block."""
    heads, kv, hd = 4, 2, 16
    (_, k, v, pad, _, _), q_rot, _, ref = _case(batch, p, heads, kv, hd, seed=batch)
    q_heads = q_rot.view(batch, p, heads, hd).transpose(1, 2)  # [B, H, P, hd]
    out = attention_masked_softmax(q_heads, k[:, :, :p], v[:, :, :p], pad, hd**-0.5).cpu()
    assert out.shape == ref.shape and (out - ref).abs().max() <= 1e-5


def test_triton_softmax_keeps_fp32_actions() -> None:
    torch.set_float32_matmul_precision("highest")
    model = _small_image_model()
    inputs = [t.to(DEVICE) for t in libero_inputs(model.cfg, batch=2, prompt_len=23, seed=5)]
    inputs[1][0, 0] = False  # element 0's first camera masked, kept for element 1
    ref = model.sample_actions(*inputs, num_steps=2)
    out = FastPi05(model, 2, Shortcuts(triton_softmax=True)).sample(*inputs)
    assert (out - ref).abs().max() <= 1e-5
