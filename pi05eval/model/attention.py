"""Attention math shared by SigLIP and the two Gemmas: masks, RoPE, grouped-query attention.

Numerics follow openpi's PyTorch path (HF eager attention): logits in the activation dtype scaled after
QK^T, masked logits set to a large *finite* negative (so a fully masked query row becomes a uniform average
instead of NaN, exactly as the reference), softmax in fp32, probabilities cast back before PV.
RoPE angles are computed in fp32 and cos/sin cast to the activation dtype before rotating (split-half form).
SigLIP, which has no mask, uses torch's SDPA instead (as openpi's HF SigLIP does).
"""

from __future__ import annotations

import torch

MASK_VALUE = -2.3819763e38  # openpi's masked-logit value (finite: fully masked rows stay finite)


def make_attention_mask(pad_mask: torch.Tensor, ar_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Query i may attend key j iff both are valid and cumsum(ar)[j] <= cumsum(ar)[i] (openpi's rule).

    pad_mask: [B, L] bool, ar_mask: [B, L] bool/int or None (= all zeros: fully bidirectional).
    Returns [B, L, L] bool.
    """
    valid = pad_mask[:, None, :] & pad_mask[:, :, None]  # [B, L, L]
    if ar_mask is None:
        return valid
    cum = torch.cumsum(ar_mask.to(torch.int64), dim=1)  # [B, L]
    return valid & (cum[:, None, :] <= cum[:, :, None])


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype, freq_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, 1, L, head_dim] in `dtype` for integer positions [B, L]; angles in fp32 as HF Gemma computes them.

    `freq_dtype` rounds the inverse frequencies first: openpi's PyTorch model keeps them in an HF buffer that its
    `.to(bfloat16)` rounds to bf16, so its bf16 mode rotates with bf16-rounded frequencies (fp32 angle math).
    """
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    inv_freq = (1.0 / (theta**exponent)).to(freq_dtype).float()  # [head_dim / 2]
    angles = positions.float()[..., None] * inv_freq  # [B, L, head_dim / 2]
    angles = torch.cat([angles, angles], dim=-1)  # [B, L, head_dim]
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Split-half rotation of x [B, H, L, head_dim]: [x1 cos - x2 sin, x2 cos + x1 sin]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Grouped-query attention without materializing repeated K/V.

    q: [B, H, L, hd]; k, v: [B, KV, S, hd] with H % KV == 0 (query head h reads kv head h // (H / KV));
    mask: [B, L, S] or [B, 1, S] bool (True = may attend) or None. Returns [B, L, H * hd] in q's dtype.
    """
    b, h, n, hd = q.shape
    kv, s = k.shape[1], k.shape[2]
    g = h // kv
    qg = q.reshape(b, kv, g * n, hd)  # [B, KV, G*L, hd]
    logits = torch.matmul(qg, k.transpose(-1, -2)) * scale  # [B, KV, G*L, S]
    logits = logits.view(b, h, n, s).float()  # [B, H, L, S]
    if mask is not None:
        logits = torch.where(mask[:, None], logits, MASK_VALUE)
    probs = torch.softmax(logits, dim=-1).to(q.dtype)  # [B, H, L, S]
    out = torch.matmul(probs.view(b, kv, g * n, s), v)  # [B, KV, G*L, hd]
    return out.view(b, h, n, hd).transpose(1, 2).reshape(b, n, h * hd)
