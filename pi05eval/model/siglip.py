"""SigLIP vision tower (So400m/14 for pi05): patch conv + learned positions, pre-LN ViT encoder, final LayerNorm.

224x224 image -> 16x16 = 256 tokens of `vision_width`; no pooling head (Pi0.5 projects every token).
Patch and position embeddings run in their parameters' dtype (fp32 in openpi's bf16 mode); the encoder then
runs in the dtype of its weights. GELU uses the tanh approximation; attention has biases and no mask and runs
through torch's SDPA like openpi's HF SigLIP (which makes the bf16 image tokens bit-identical to openpi's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pi05eval.model.config import Pi05Config


class SiglipAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.o_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape  # [N, T, D]
        hd = d // self.heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(n, t, self.heads, hd).transpose(1, 2)  # [N, heads, T, hd]

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v, scale=hd**-0.5)  # [N, heads, T, hd]
        return self.o_proj(out.transpose(1, 2).reshape(n, t, d))  # [N, T, D]


class SiglipMLP(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipLayer(nn.Module):
    def __init__(self, cfg: Pi05Config) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.vision_width, eps=cfg.vision_ln_eps)
        self.attn = SiglipAttention(cfg.vision_width, cfg.vision_heads)
        self.norm2 = nn.LayerNorm(cfg.vision_width, eps=cfg.vision_ln_eps)
        self.mlp = SiglipMLP(cfg.vision_width, cfg.vision_mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SiglipEncoder(nn.Module):
    """Images [N, 3, H, W] in [-1, 1] -> tokens [N, num_patches, vision_width] (after the final LayerNorm)."""

    def __init__(self, cfg: Pi05Config) -> None:
        super().__init__()
        d = cfg.vision_width
        self.patch_embed = nn.Conv2d(3, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = nn.Parameter(nn.init.normal_(torch.empty(cfg.num_patches, d), std=d**-0.5))  # [T, D]
        self.layers = nn.ModuleList(SiglipLayer(cfg) for _ in range(cfg.vision_depth))
        self.norm = nn.LayerNorm(d, eps=cfg.vision_ln_eps)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels.to(self.patch_embed.weight.dtype))  # [N, D, 16, 16]
        x = x.flatten(2).transpose(1, 2) + self.pos_embed  # [N, T, D]
        x = x.to(self.compute_dtype)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)  # [N, T, D]
