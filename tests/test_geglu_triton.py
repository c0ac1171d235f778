"""The prefill's gate|up GEMM with GeGLU in its epilogue (`triton_geglu`): the kernel alone and inside `FastPi05`.

Without CUDA the kernel runs in Triton's interpreter (pointer loads, fp32); on Hopper the engine's TMA kernel runs.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton is not installed (pip install triton)", allow_module_level=True)

import triton_interpreter as interp

DEVICE = interp.DEVICE
_SET_HERE = interp.turn_on()

from pi05eval.bench import libero_inputs, random_model  # noqa: E402
from pi05eval.engines.fast import FastPi05, Shortcuts  # noqa: E402
from pi05eval.kernels.config import interleave_gate_up  # noqa: E402
from pi05eval.kernels.geglu_triton import geglu_gemm, geglu_gemm_ptr_kernel, launch_geglu_gemm  # noqa: E402

interp.turn_off(_SET_HERE)


@pytest.fixture(autouse=True)
def _interpreter_env(request, monkeypatch):
    if DEVICE.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    if not interp.interpreted(geglu_gemm_ptr_kernel):  # Triton came in earlier without the interpreter
        interp.rerun_in_fresh_process(request)
        pytest.skip("passed in a fresh process with Triton's interpreter")


def _reference(x: torch.Tensor, w_gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = (x @ w_gate_up.T).chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


@pytest.mark.parametrize(("m", "k", "f"), [(45, 64, 128), (16, 32, 32), (130, 128, 256)])
def test_kernel_matches_gelu_gate_times_up(m, k, f) -> None:
    """Rows not a multiple of the tile (45, 130), one and several tiles along F and K; fp32 in the interpreter."""
    torch.set_float32_matmul_precision("highest")
    g = torch.Generator().manual_seed(m)
    x, w = torch.randn(m, k, generator=g), torch.randn(2 * f, k, generator=g) * k**-0.5
    out = geglu_gemm(x.to(DEVICE), interleave_gate_up(w).to(DEVICE)).cpu()
    ref = _reference(x, w)
    assert out.shape == (m, f) and (out - ref).abs().max() <= 1e-5


def test_rejects_shapes_it_does_not_tile() -> None:
    x = torch.randn(8, 48, device=DEVICE)
    with pytest.raises(ValueError, match="power-of-2 tiles"):
        geglu_gemm(x, torch.randn(2 * 40, 48, device=DEVICE))  # 2F = 80: no power-of-2 tile of it
    with pytest.raises(ValueError, match="w_pairs"):
        launch_geglu_gemm(x[:, :32], torch.randn(64, 64, device=DEVICE), torch.empty(8, 32, device=DEVICE))


def test_triton_geglu_keeps_fp32_actions() -> None:
    """The whole fast path with the kernel in every prefix layer (batch 2, a 23-token prompt)."""
    torch.set_float32_matmul_precision("highest")
    model = random_model("tiny", DEVICE, seed=3).set_precision("fp32")
    inputs = [t.to(DEVICE) for t in libero_inputs(model.cfg, batch=2, prompt_len=23, seed=5)]
    ref = model.sample_actions(*inputs, num_steps=2)
    fast = FastPi05(model, 2, Shortcuts(triton_geglu=True, triton_softmax=False))  # the softmax has its own test
    assert all(p.gu_pairs is not None and p.fused_gu is None for p in fast.llm)  # the kernel's path is taken
    assert (fast.sample(*inputs) - ref).abs().max() <= 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_at_pi05_prefill_shape_is_as_close_as_pytorch() -> None:
    """bf16 at Pi0.5's prefill shape (544 x 2048 -> 16384): as close to fp32 math as the PyTorch bf16 path."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(544, 2048, device="cuda", generator=g)
    w = torch.randn(2 * 16384, 2048, device="cuda", generator=g) * 2048**-0.5
    xb, wb = x.bfloat16(), w.bfloat16()
    exact = _reference(xb.float(), wb.float())
    err_torch = (_reference(xb, wb).float() - exact).abs().max()
    err_triton = (geglu_gemm(xb, interleave_gate_up(wb)).float() - exact).abs().max()
    assert err_triton <= 1.5 * err_torch
