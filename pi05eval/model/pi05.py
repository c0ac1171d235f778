"""Pi0.5: SigLIP + Gemma prefix LLM + adaRMS action expert, sampled with a flow-matching Euler loop.

    prefix  = [SigLIP(img) @ projector for 3 images (256 tokens each)] + [embed(prompt) * sqrt(width)]
    prefill : prefix LLM over the prefix (bidirectional among valid tokens, positions = cumsum(mask) - 1)
              -> per-layer K (after RoPE) / V cache
    step    : v = action_out(expert(action_in(x_t) | cache, adaRMS cond = timeMLP(sincos(t))))
    sample  : x_1 = noise; x <- x + dt * v for t = 1, 1 + dt, ... (fp32-accumulated as openpi), dt = -1/steps

The stages are public (`embed_prefix`, `prefill`, `time_modulations`, `denoise_step`) so engines can compile or
graph-capture them from outside, or call them on a trimmed prefix (masked images / pad tokens dropped): positions
come from the mask's cumsum and the suffix starts at the number of valid prefix tokens, so trimming is exact.
"""

from __future__ import annotations

import math
import re
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pi05eval.model.attention import make_attention_mask, rope_cos_sin
from pi05eval.model.config import Pi05Config
from pi05eval.model.gemma import ActionExpert, GemmaLM
from pi05eval.model.siglip import SiglipEncoder

Precision = Literal["bf16", "fp32"]
PRECISIONS: tuple[str, ...] = ("bf16", "fp32")

# Parameters openpi keeps in fp32 in its bf16 inference mode (to_bfloat16_for_selected_params, SPEC §9):
# SigLIP patch/position embeddings, every (ada)RMSNorm parameter, and the action/time heads.
_FP32_PARAM = re.compile(
    r"^(vision\.patch_embed\.|vision\.pos_embed$|llm\.(layers\.\d+\.)?(attn_norm|mlp_norm|norm)\.weight$"
    r"|expert\.(layers\.\d+\.)?(attn_norm|mlp_norm|norm)\.dense\.|action_(in|out)\.|time_(in|out)\.)"
)


def keeps_fp32(param_name: str) -> bool:
    """Whether a `Pi05Model` parameter stays fp32 in bf16 mode."""
    return _FP32_PARAM.match(param_name) is not None


class PrefixCache(NamedTuple):
    """What the denoise steps read from the prefill (never written after it)."""

    k: torch.Tensor  # [depth, B, KV, P, hd] prefix keys, RoPE applied
    v: torch.Tensor  # [depth, B, KV, P, hd] prefix values
    pad_mask: torch.Tensor  # [B, P] bool, valid prefix tokens
    lengths: torch.Tensor  # [B] int64, valid prefix tokens = position of the first action token


def euler_schedule(num_steps: int) -> tuple[list[float], float]:
    """(t for each step, dt) exactly as openpi's PyTorch loop: fp32 `t += dt` while t >= -dt / 2.

    Computed on the host so the sampled call never reads a device value. t = 1.0, 0.9, 0.79999995, ...
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    dt = np.float32(-1.0 / num_steps)
    t = np.float32(1.0)
    times: list[float] = []
    while t >= -dt / np.float32(2.0):
        times.append(float(t))
        t = np.float32(t + dt)
    if len(times) != num_steps:  # cannot happen for sane step counts; guards the float reasoning above
        raise RuntimeError(f"fp32 schedule for {num_steps} steps has {len(times)} steps")
    return times, float(dt)


def time_embedding(t: torch.Tensor, dim: int, min_period: float, max_period: float) -> torch.Tensor:
    """Sin-then-cos embedding of t [B] -> [B, dim] fp32, computed in fp64 as openpi's PyTorch model does."""
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=t.device)
    period = min_period * (max_period / min_period) ** fraction  # [dim / 2]
    scaling = 1.0 / period * 2 * math.pi
    angle = scaling[None, :] * t[:, None]  # [B, dim / 2] fp64
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1).float()


class Pi05Model(nn.Module):
    """Pi0.5 in plain PyTorch; see the module docstring. Build on "meta" and fill with `weights.load_pi05`."""

    def __init__(self, cfg: Pi05Config) -> None:
        super().__init__()
        self.cfg = cfg
        de = cfg.expert_width
        self.vision = SiglipEncoder(cfg)
        self.projector = nn.Linear(cfg.vision_width, cfg.width)  # no 1/sqrt(width) scaling (openpi)
        self.llm = GemmaLM(cfg)
        self.expert = ActionExpert(cfg)
        self.action_in = nn.Linear(cfg.action_dim, de)
        self.action_out = nn.Linear(de, cfg.action_dim)
        self.time_in = nn.Linear(de, de)
        self.time_out = nn.Linear(de, de)
        self.precision: Precision = "fp32"

    def set_precision(self, precision: Precision) -> Pi05Model:
        """Cast parameters: `bf16` = openpi's inference precision (bf16 except `keeps_fp32`), `fp32` = all fp32."""
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choices: {PRECISIONS}")
        low = torch.bfloat16 if precision == "bf16" else torch.float32
        for name, param in self.named_parameters():
            dtype = torch.float32 if keeps_fp32(name) else low
            if param.dtype != dtype:
                param.data = param.data.to(dtype)
        self.precision = precision
        self.llm.dtype_ = self.expert.dtype_ = low
        return self

    # ------------------------------------------------------------------------------------------------ prefix

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, N, 3, 224, 224] in [-1, 1] -> projected tokens [B, N * 256, width]."""
        b, n = images.shape[:2]
        tokens = self.projector(self.vision(images.flatten(0, 1)))  # [B * N, T, width]
        return tokens.reshape(b, n * tokens.shape[1], tokens.shape[2])

    def embed_prefix(
        self, images: torch.Tensor, image_masks: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> prefix_embs [B, P, width], pad_mask [B, P] bool, att_mask [B, P] bool (all False: bidirectional)."""
        img = self.embed_images(images)  # [B, N * T, width]
        lang = self.llm.embed_tokens(tokens).to(img.dtype)  # [B, L, width]
        pad_mask = torch.cat([image_masks.repeat_interleave(self.cfg.num_patches, dim=1), token_mask], dim=1)
        return torch.cat([img, lang], dim=1), pad_mask, torch.zeros_like(pad_mask)

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE cos/sin [B, 1, L, head_dim] in `dtype` for positions [B, L] (frequencies per the config)."""
        freq_dtype = dtype if self.cfg.rope_freqs_in_compute_dtype else torch.float32
        return rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, dtype, freq_dtype)

    def _run_llm(
        self, prefix_embs: torch.Tensor, pad_mask: torch.Tensor, att_mask: torch.Tensor | None, full: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        positions = torch.cumsum(pad_mask.to(torch.int64), dim=1) - 1  # [B, P]; masked tokens do not advance
        cos, sin = self._rope(positions, self.llm.compute_dtype)
        return self.llm(prefix_embs, cos, sin, make_attention_mask(pad_mask, att_mask), full=full)

    def prefill(
        self, prefix_embs: torch.Tensor, pad_mask: torch.Tensor, att_mask: torch.Tensor | None = None
    ) -> PrefixCache:
        """Prefix LLM over [B, P, width] -> the K/V cache of every layer."""
        k, v, _ = self._run_llm(prefix_embs, pad_mask, att_mask, full=False)
        return PrefixCache(k, v, pad_mask, pad_mask.sum(dim=1))

    def prefix_hidden(
        self, prefix_embs: torch.Tensor, pad_mask: torch.Tensor, att_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The prefix LLM's final-norm output [B, P, width]; unused by the actions (kept for parity checks)."""
        return self._run_llm(prefix_embs, pad_mask, att_mask, full=True)[2]

    # ------------------------------------------------------------------------------------------------ suffix

    def time_conditioning(self, t: torch.Tensor) -> torch.Tensor:
        """t [B] fp32 -> adaRMS condition [B, expert_width] fp32: swish(out(swish(in(sincos(t)))))."""
        emb = time_embedding(t, self.cfg.expert_width, self.cfg.time_min_period, self.cfg.time_max_period)
        return F.silu(self.time_out(F.silu(self.time_in(emb))))

    def time_modulations(self, t: torch.Tensor) -> torch.Tensor:
        """t [B] -> every adaRMS (scale, shift, gate) [2 * depth + 1, B, 3 * expert_width]; depends on t only."""
        return self.expert.modulations(self.time_conditioning(t))

    def denoise_step(
        self, x_t: torch.Tensor, t: torch.Tensor, cache: PrefixCache, mods: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Velocity v_t [B, H, action_dim] fp32 for x_t [B, H, action_dim] fp32 at time t [B] fp32.

        `mods` = `time_modulations(t)` may be passed precomputed (e.g. one table per step of a fixed schedule).
        """
        if mods is None:
            mods = self.time_modulations(t)
        b, h, _ = x_t.shape
        positions = cache.lengths[:, None] + torch.arange(h, device=x_t.device)  # [B, H]
        key_mask = torch.cat([cache.pad_mask, cache.pad_mask.new_ones(b, h)], dim=1)[:, None]  # [B, 1, P + H]
        cos, sin = self._rope(positions, self.expert.compute_dtype)
        out = self.expert(self.action_in(x_t), mods, cos, sin, cache.k, cache.v, key_mask)  # [B, H, De]
        return self.action_out(out.float())

    @torch.no_grad()
    def sample_actions(
        self,
        images: torch.Tensor,
        image_masks: torch.Tensor,
        tokens: torch.Tensor,
        token_mask: torch.Tensor,
        noise: torch.Tensor,
        num_steps: int = 10,
    ) -> torch.Tensor:
        """images [B, 3, 3, 224, 224] in [-1, 1], image_masks [B, 3] bool, tokens/token_mask [B, L],
        noise [B, H, action_dim] -> actions [B, H, action_dim] fp32 (x at t = 0). No host sync inside."""
        cache = self.prefill(*self.embed_prefix(images, image_masks, tokens, token_mask))
        times, dt = euler_schedule(num_steps)
        x = noise.float()
        for t in times:
            t_vec = torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)
            x = x + dt * self.denoise_step(x, t_vec, cache)
        return x
