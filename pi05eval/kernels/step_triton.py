"""Triton kernels around the expert layers of one Euler step (replacing ~12 small PyTorch kernels per step).

* `action_in_kernel`  h = round(x @ W_in.T + b_in): the action tokens into the residual stream (fp32 math); optionally
                      zeroes an fp32 buffer of h's shape (the O accumulator of `atomic_triton`).
* `step_out_kernel`   final adaRMS norm of h (every program), v = round(norm).float() @ W_out.T + b_out (fp32),
                      x_next = x + dt * v; programs split the action dimension. Optionally applies first the gated
                      residual the last down projection left pending (`atomic_triton.apply_pending`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from pi05eval.kernels.atomic_triton import apply_pending
from pi05eval.kernels.expert_triton import NORM_BLOCK_M, _rnd, ada_rms_norm, block_m, pdl_options


@triton.jit
def action_in_kernel(
    x_ptr,  # fp32 [M, A]: x_t
    w_ptr,  # fp32 [D, A]
    b_ptr,  # fp32 [D]
    h_ptr,  # [M, D] act: residual stream (output)
    zero_ptr,  # fp32 [M, D]: zeroed (ZERO)
    M,
    A: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ZERO: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    if USE_PDL:
        gdc_launch_dependents()
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    ra = tl.arange(0, A)
    row_ok = rm < M
    w = tl.load(w_ptr + rn[:, None] * A + ra[None, :])
    bias = tl.load(b_ptr + rn)[None, :]
    if USE_PDL:
        gdc_wait()  # the previous kernel (which wrote x) is complete
    x = tl.load(x_ptr + rm[:, None] * A + ra[None, :], mask=row_ok[:, None], other=0.0)
    y = tl.dot(x, tl.trans(w), input_precision="ieee") + bias
    off = rm[:, None] * D + rn[None, :]
    tl.store(h_ptr + off, y.to(h_ptr.dtype.element_ty), mask=row_ok[:, None])
    if ZERO:
        tl.store(zero_ptr + off, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), mask=row_ok[:, None])


@triton.jit
def step_out_kernel(
    h_ptr,  # [M, D] act: residual stream after the last layer
    mod_ptr,  # fp32 [3D]: final adaRMS (scale | shift | gate)
    w_ptr,  # fp32 [A, D]: action_out
    b_ptr,  # fp32 [A]
    x_ptr,  # fp32 [M, A]: x_t
    out_ptr,  # fp32 [M, A]: x_t + dt * v_t
    acc_ptr,  # fp32 [M, D]: a pending residual's sums (APPLY)
    gate_ptr,  # fp32 [D]: its gate (APPLY)
    M,
    eps,
    dt,
    A: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_A: tl.constexpr,
    MOD_LATE: tl.constexpr,
    APPLY: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    if USE_PDL:
        gdc_launch_dependents()
    ra = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, D)
    row_ok = rm < M
    w = tl.load(w_ptr + ra[:, None] * D + rk[None, :])
    bias = tl.load(b_ptr + ra)[None, :]
    scale, shift = 0.0, 0.0
    if not MOD_LATE:
        scale = tl.load(mod_ptr + rk)[None, :]
        shift = tl.load(mod_ptr + D + rk)[None, :]
    gate = 0.0
    if APPLY:
        gate = _rnd(tl.load(gate_ptr + rk), h_ptr.dtype.element_ty)[None, :]
    if USE_PDL:
        gdc_wait()  # the previous kernel (which wrote h) is complete
    h = tl.load(h_ptr + rm[:, None] * D + rk[None, :], mask=row_ok[:, None], other=0.0)
    if APPLY:
        h = apply_pending(h, acc_ptr, gate, rm, rk, row_ok, D)
    y = ada_rms_norm(h, mod_ptr, rk, D, eps, scale, shift, MOD_LATE).to(tl.float32)  # round(norm).float()
    v = tl.dot(y, tl.trans(w), input_precision="ieee") + bias
    xo = rm[:, None] * A + ra[None, :]
    x = tl.load(x_ptr + xo, mask=row_ok[:, None], other=0.0)
    tl.store(out_ptr + xo, x + dt * v, mask=row_ok[:, None])


def launch_action_in(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, h: torch.Tensor, *, bn: int, pdl: bool,
    zero: torch.Tensor | None = None,
) -> None:  # fmt: skip
    """h [M, D] = round(x [M, A] @ w [D, A].T + b [D]) (fp32 x, w, b); zero fp32 [M, D] (optional) is zeroed."""
    m, a = x.shape
    d = w.shape[0]
    bm = block_m(m)
    action_in_kernel[(d // bn, triton.cdiv(m, bm))](
        x, w, b, h, h if zero is None else zero, m, A=a, D=d, BLOCK_M=bm, BLOCK_N=bn, ZERO=zero is not None,
        num_warps=4, **pdl_options(pdl),
    )  # fmt: skip


def launch_step_out(
    h: torch.Tensor,
    mod: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    x: torch.Tensor,
    out: torch.Tensor,
    *,
    eps: float,
    dt: float,
    mod_late: bool,
    pdl: bool,
    pending: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """out [M, A] = x + dt * (round(adaRMS(h'; mod)).float() @ w [A, D].T + b), h' = h with the pending residual
    (acc fp32 [M, D], gate fp32 [D]) of `atomic_triton` applied, or h."""
    m, d = h.shape
    a = w.shape[0]
    bm = block_m(m, NORM_BLOCK_M)
    acc, gate = pending if pending is not None else (h, mod)  # placeholders, not read
    step_out_kernel[(a // 16, triton.cdiv(m, bm))](
        h, mod, w, b, x, out, acc, gate, m, eps, dt, A=a, D=d, BLOCK_M=bm, BLOCK_A=16, MOD_LATE=mod_late,
        APPLY=pending is not None, num_warps=8, **pdl_options(pdl),
    )  # fmt: skip
