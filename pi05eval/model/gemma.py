"""Gemma blocks of Pi0.5: the PaliGemma prefix LLM (Gemma-2B) and the action expert (Gemma-300M with adaRMS).

Both are pre-norm decoders with multi-query attention, RoPE and GeGLU (gelu-tanh). The prefix LLM uses RMSNorm
with a (1 + w) scale and plain residuals; the expert replaces every norm by adaRMSNorm: no scale vector, a
Dense(cond) modulation gives (scale, shift, gate), and the gate multiplies the residual branch. The expert's
attention reads the prefix K/V cache (K after RoPE) concatenated with its own K/V; the cache is never updated.
Norm statistics and modulation run in fp32; everything else in the dtype of the layer weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pi05eval.model.attention import apply_rope, attention
from pi05eval.model.config import Pi05Config


def _rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) in fp32 (x itself may be bf16: promoted, as openpi does)."""
    var = torch.mean(torch.square(x.float()), dim=-1, keepdim=True)
    return x * torch.rsqrt(var + eps)


class RMSNorm(nn.Module):
    """Gemma RMSNorm: y = normalize(x) * (1 + w), computed in fp32, returned in x's dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (_rms_normalize(x, self.eps) * (1.0 + self.weight.float())).to(x.dtype)


class AdaRMSNorm(nn.Module):
    """adaRMSNorm: y = normalize(x) * (1 + scale) + shift with (scale, shift, gate) = split(Dense(cond), 3)."""

    def __init__(self, dim: int, cond_dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.dense = nn.Linear(cond_dim, 3 * dim)

    def forward(self, x: torch.Tensor, modulation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, L, D], modulation [B, 3D] (= self.dense(cond), fp32) -> (y [B, L, D], gate [B, 1, D])."""
        scale, shift, gate = modulation[:, None].chunk(3, dim=-1)  # each [B, 1, D]
        y = _rms_normalize(x, self.eps) * (1.0 + scale.float()) + shift.float()
        return y.to(x.dtype), gate.to(x.dtype)


class GemmaAttention(nn.Module):
    """Q/K/V/O projections (no biases) with RoPE on Q and K."""

    def __init__(self, width: int, cfg: Pi05Config) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(width, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, width, bias=False)

    def _heads(self, y: torch.Tensor, n: int) -> torch.Tensor:
        b, length, _ = y.shape
        return y.view(b, length, n, self.head_dim).transpose(1, 2)  # [B, n, L, hd]

    def kv(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [B, L, D] -> K (after RoPE), V: [B, KV, L, hd]."""
        k = apply_rope(self._heads(self.k_proj(h), self.kv_heads), cos, sin)
        return k, self._heads(self.v_proj(h), self.kv_heads)

    def q(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """h [B, L, D] -> Q (after RoPE) [B, H, L, hd]."""
        return apply_rope(self._heads(self.q_proj(h), self.heads), cos, sin)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.o_proj(attention(q, k, v, mask, self.head_dim**-0.5))  # [B, L, D]


class GeGLU(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(width, hidden, bias=False)
        self.up_proj = nn.Linear(width, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class LLMLayer(nn.Module):
    def __init__(self, cfg: Pi05Config) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.width, cfg.rms_eps)
        self.attn = GemmaAttention(cfg.width, cfg)
        self.mlp_norm = RMSNorm(cfg.width, cfg.rms_eps)
        self.mlp = GeGLU(cfg.width, cfg.mlp_dim)

    def kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Only this layer's K/V (what the cache needs from the last layer)."""
        return self.attn.kv(self.attn_norm(x), cos, sin)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, P, D], mask [B, P, P] -> (x [B, P, D], K, V [B, KV, P, hd])."""
        h = self.attn_norm(x)
        k, v = self.attn.kv(h, cos, sin)
        x = x + self.attn.attend(self.attn.q(h, cos, sin), k, v, mask)
        x = x + self.mlp(self.mlp_norm(x))
        return x, k, v


class ExpertLayer(nn.Module):
    def __init__(self, cfg: Pi05Config) -> None:
        super().__init__()
        d = cfg.expert_width
        self.attn_norm = AdaRMSNorm(d, d, cfg.rms_eps)
        self.attn = GemmaAttention(d, cfg)
        self.mlp_norm = AdaRMSNorm(d, d, cfg.rms_eps)
        self.mlp = GeGLU(d, cfg.expert_mlp_dim)

    def forward(
        self,
        x: torch.Tensor,
        mod_attn: torch.Tensor,
        mod_mlp: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        prefix_k: torch.Tensor,
        prefix_v: torch.Tensor,
        key_mask: torch.Tensor,
    ) -> torch.Tensor:
        """x [B, H, D]; prefix_k/v [B, KV, P, hd]; key_mask [B, 1, P + H] -> x [B, H, D]."""
        h, gate = self.attn_norm(x, mod_attn)
        k, v = self.attn.kv(h, cos, sin)  # [B, KV, H, hd]
        k = torch.cat([prefix_k, k], dim=2)  # [B, KV, P + H, hd]
        v = torch.cat([prefix_v, v], dim=2)
        x = x + self.attn.attend(self.attn.q(h, cos, sin), k, v, key_mask) * gate
        h, gate = self.mlp_norm(x, mod_mlp)
        return x + self.mlp(h) * gate


class GemmaLM(nn.Module):
    """PaliGemma's language model, run over the prefix only to fill the K/V cache."""

    def __init__(self, cfg: Pi05Config) -> None:
        super().__init__()
        embed = nn.init.normal_(torch.empty(cfg.vocab_size, cfg.width), std=cfg.width**-0.5)
        self.embed = nn.Parameter(embed)  # [V, D], tied with PaliGemma's lm_head
        self.layers = nn.ModuleList(LLMLayer(cfg) for _ in range(cfg.depth))
        self.norm = RMSNorm(cfg.width, cfg.rms_eps)

    @property
    def compute_dtype(self) -> torch.dtype:
        """Activation dtype: set by `Pi05Model.set_precision` (layers may be swapped for quantized ones later)."""
        return getattr(self, "dtype_", None) or self.layers[0].attn.q_proj.weight.dtype

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, L] -> embeddings * sqrt(width) [B, L, D] (the scaling Gemma applies to text)."""
        return F.embedding(tokens, self.embed) * math.sqrt(self.embed.shape[1])

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, *, full: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x [B, P, D] -> K, V [depth, B, KV, P, hd] and, if `full`, the final-norm output [B, P, D].

        Without `full` the last layer computes only its K/V (its output feeds nothing the actions use).
        """
        ks, vs = [], []
        x = x.to(self.compute_dtype)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if i == last and not full:
                k, v = layer.kv(x, cos, sin)
            else:
                x, k, v = layer(x, cos, sin, mask)
            ks.append(k)
            vs.append(v)
        return torch.stack(ks), torch.stack(vs), self.norm(x) if full else None


class ActionExpert(nn.Module):
    """Gemma-300M with adaRMS time conditioning over the action tokens; no embedding table."""

    def __init__(self, cfg: Pi05Config) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ExpertLayer(cfg) for _ in range(cfg.depth))
        self.norm = AdaRMSNorm(cfg.expert_width, cfg.expert_width, cfg.rms_eps)

    @property
    def compute_dtype(self) -> torch.dtype:
        """Activation dtype: set by `Pi05Model.set_precision` (layers may be swapped for quantized ones later)."""
        return getattr(self, "dtype_", None) or self.layers[0].attn.q_proj.weight.dtype

    def modulations(self, cond: torch.Tensor) -> torch.Tensor:
        """cond [B, D] -> [2 * depth + 1, B, 3D]: per layer (attn norm, mlp norm), then the final norm.

        Depends only on the time step, so it can be precomputed per step (an exact optimization).
        """
        norms = [n for layer in self.layers for n in (layer.attn_norm, layer.mlp_norm)] + [self.norm]
        return torch.stack([n.dense(cond) for n in norms])

    def forward(
        self,
        x: torch.Tensor,
        mods: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        key_mask: torch.Tensor,
    ) -> torch.Tensor:
        """x [B, H, D], mods [2 * depth + 1, B, 3D], cache [depth, B, KV, P, hd] -> final-norm output [B, H, D]."""
        x = x.to(self.compute_dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, mods[2 * i], mods[2 * i + 1], cos, sin, cache_k[i], cache_v[i], key_mask)
        y, _ = self.norm(x, mods[-1])
        return y
