"""Pi0.5's call rewritten for speed with exact shortcuts only (same math as `Pi05Model.sample_actions` up to rounding).

Built from a loaded `Pi05Model` (its modules are reused for norms, attention and the vision tower); the model file
itself stays plain. Each shortcut can be switched off for A/B:

* `trim_prefix`   drop masked image slots and pad tokens beyond the prompt's length bucket (positions follow the
                  mask, and masked keys contribute nothing, so the actions are unchanged);
* `fold_time`     the time MLP and every adaRMS (scale, shift, gate) depend only on the step's t, which a fixed
                  schedule fixes: computed once at build time, one table per step;
* `fuse_qkv`      Q, K and V projections as one GEMM; `fuse_gate_up`: GeGLU gate and up as one GEMM;
                  `fuse_vision_qkv`: SigLIP's Q, K, V (with biases) as one GEMM;
* `pad_vision_mlp` SigLIP's MLP hidden size zero-padded to a multiple of 128 (4304 -> 4352): zero fc1 rows give
                  gelu(0) = 0, which zero fc2 columns multiply, so the sum is unchanged; aligned rows let cuBLAS add
                  fc1's bias in its epilogue (inductor pads a 4304-wide buffer's stride, which forces a separate
                  bias copy) and give fc2 an aligned K;
* `gelu_epilogue` on CUDA, SigLIP's fc1 + bias + tanh-GELU as one cuBLASLt call (`torch._addmm_activation`): GELU is
                  applied to the fp32 result in the GEMM's epilogue, one bf16 rounding fewer than a separate GELU;
* `patch_gemm`    SigLIP's patch embedding (a stride-14 convolution in fp32) as one fp32 GEMM over the image's
                  14 x 14 x 3 patches, the same products and sums as the convolution up to fp32 order. Off: one
                  H100 run measured vision 1.848 -> 1.814 ms, not yet confirmed on an H200;
* `rope_table`    RoPE cos / sin of every position a call can use (0 .. prefix + horizon) computed once at build time;
                  a call gathers its rows by position instead of evaluating pow / cos / sin (inductor inlines those
                  into every layer's rotation kernel). Same function of the same integer positions;
* `static_kv`     one preallocated K/V buffer per layer [prefix | actions]: the prefill writes the prefix part once,
                  each denoise step overwrites the action part (no per-layer concatenation of the cache);
* `sdpa_prefix`   prefix attention through `F.scaled_dot_product_attention` (fused kernels) instead of matmul-
                  softmax-matmul; the 8 query heads are read as 8·P rows against the single K/V head. Padded prompt
                  tokens (inside a bucket) attend to themselves only, so no row is fully masked (no NaN). The denoise
                  attention (80 rows) stays matmul-softmax-matmul: on an H200 the fused kernels chosen for it were
                  slower (cuDNN ~39 µs per call vs a few µs for inductor's fused softmax + two small GEMMs);
* `triton_prefix` on CUDA (or in Triton's interpreter), the prefix attention and the queries' RoPE as one Triton kernel
                  (`pi05eval/kernels/prefix_attention_triton.py`, flash style): q is rotated on load, padding tokens
                  are masked as keys only (their own rows never reach a valid token), output in the O projection's
                  layout. Tiles: `prefix_attention_triton.TILES`;
* `triton_softmax` on CUDA (or in Triton's interpreter), the prefix attention's softmax (scale, pad x pad mask, fp32
                  softmax, rounding) as one Triton pass between the two GEMMs (`kernels/softmax_triton.py`).
* `triton_geglu`  on CUDA (or in Triton's interpreter), the prefix layers' gate|up GEMM with GeGLU in its epilogue, one
                  Triton kernel over pair-interleaved weights (`kernels/geglu_triton.py`) instead of cuBLAS + a GeGLU
                  pass; needs `fuse_gate_up` and plain float layers.

The stages take only tensors and Python constants so `engines/compile.py` can compile and graph-capture them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pi05eval.engines.fast_vision import FastVision
from pi05eval.model.attention import apply_rope, attention
from pi05eval.model.pi05 import Pi05Model, euler_schedule


@dataclass(frozen=True)
class Shortcuts:
    """Which exact shortcuts the fast path takes (all on by default)."""

    trim_prefix: bool = True
    fold_time: bool = True
    fuse_qkv: bool = True
    fuse_gate_up: bool = True
    fuse_vision_qkv: bool = True
    static_kv: bool = False  # measured slower on an H200 (17.1 vs 18.6 ms p50): the slice writes cost more than cat
    sdpa_prefix: bool = False  # measured slower on an H200 (prefill 4.9 vs 4.2 ms): off by default
    pad_vision_mlp: bool = True
    gelu_epilogue: bool = True
    patch_gemm: bool = False  # one H100 run: vision -0.03 ms; off until an H200 A/B confirms it
    rope_table: bool = True
    triton_softmax: bool = True
    triton_prefix: bool = False  # measured slower on an H200 (28 vs 23.5 µs per layer): off by default
    triton_geglu: bool = False  # measured no faster on an H200 (prefill 3.98 ms either way): off by default


class _Proj:
    """Q/K/V and gate/up projections of one Gemma layer, fused into single GEMMs or not.

    Layers a precision plan replaced (`pi05eval/precision/linear.py`) fuse too where their kind allows it; plain
    float layers keep their fused weight in `wqkv` / `wgu` (for kernels that read the weights directly)."""

    def __init__(self, layer: torch.nn.Module, s: Shortcuts, triton_geglu: bool = False) -> None:
        from pi05eval.precision.linear import fuse_linears

        a, m = layer.attn, layer.mlp
        self.q_rows = a.q_proj.out_features
        self.kv_rows = a.k_proj.out_features
        self.attn, self.mlp = a, m
        self.fused_qkv = fuse_linears([a.q_proj, a.k_proj, a.v_proj]) if s.fuse_qkv else None
        self.fused_gu = fuse_linears([m.gate_proj, m.up_proj]) if s.fuse_gate_up else None
        self.wqkv = self.fused_qkv.weight if isinstance(self.fused_qkv, torch.nn.Linear) else None
        self.wgu = self.fused_gu.weight if isinstance(self.fused_gu, torch.nn.Linear) else None
        self.gu_pairs = None  # [2F, D], rows 2j = gate j, 2j + 1 = up j: the Triton GeGLU GEMM's weight
        if triton_geglu and self.wgu is not None and _triton_ok(self.wgu):
            from pi05eval.kernels.config import interleave_gate_up

            self.gu_pairs = interleave_gate_up(self.wgu.detach())
            self.fused_gu = self.wgu = None  # the interleaved copy replaces the fused weight

    def qkv(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h [B, L, D] -> q [B, L, H*hd], k, v [B, L, KV*hd]."""
        if self.fused_qkv is None:
            return self.attn.q_proj(h), self.attn.k_proj(h), self.attn.v_proj(h)
        return self.fused_qkv(h).split([self.q_rows, self.kv_rows, self.kv_rows], dim=-1)

    def geglu(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, L, D] -> down(gelu(gate h) * up h) [B, L, D]."""
        if self.gu_pairs is not None:
            from pi05eval.kernels.geglu_triton import geglu_gemm

            b, n, d = h.shape
            return self.mlp.down_proj(geglu_gemm(h.reshape(b * n, d), self.gu_pairs).view(b, n, -1))
        if self.fused_gu is None:
            return self.mlp(h)
        gate, up = self.fused_gu(h).chunk(2, dim=-1)
        return self.mlp.down_proj(F.gelu(gate, approximate="tanh") * up)


def _triton_ok(t: torch.Tensor) -> bool:
    """Whether a Triton kernel can take t: on CUDA, or anywhere in Triton's interpreter."""
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [B, H, L, hd], k/v [B, KV, S, hd], mask [B, L or 1, S] bool -> [B, L, H * hd] (as `attention`).

    Query head h reads K/V head h // (H / KV): the G = H / KV heads of a group become G·L rows of one head.
    """
    b, h, n, hd = q.shape
    kv = k.shape[1]
    g = h // kv
    qg = q.reshape(b, kv, g * n, hd)  # [B, KV, G*L, hd]
    m = mask[:, None] if mask.shape[1] == 1 else mask[:, None].repeat(1, 1, g, 1)  # [B, 1, G*L or 1, S], head-major
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=m, scale=hd**-0.5)  # [B, KV, G*L, hd]
    return out.view(b, h, n, hd).transpose(1, 2).reshape(b, n, h * hd)


def _heads(y: torch.Tensor, n: int, hd: int) -> torch.Tensor:
    b, length, _ = y.shape
    return y.view(b, length, n, hd).transpose(1, 2)  # [B, n, L, hd]


class FastPi05:
    """The fast path's stages: `vision`, `prefill`, `denoise`; `sample` runs them in order."""

    def __init__(self, model: Pi05Model, num_steps: int, shortcuts: Shortcuts | None = None) -> None:
        shortcuts = shortcuts or Shortcuts()
        self.model = model
        self.cfg = model.cfg
        self.s = shortcuts
        self.num_steps = num_steps
        self.times, self.dt = euler_schedule(num_steps)
        self.llm = [_Proj(layer, shortcuts, shortcuts.triton_geglu) for layer in model.llm.layers]
        self.expert = [_Proj(layer, shortcuts) for layer in model.expert.layers]
        self.siglip = FastVision(model, shortcuts)
        self.rope_tables: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}  # dtype -> cos, sin [N, hd]
        if shortcuts.rope_table:
            dev = model.action_in.weight.device
            positions = torch.arange(self.cfg.prefix_len + self.cfg.action_horizon, device=dev)[None]  # [1, N]
            for dtype in {model.llm.compute_dtype, model.expert.compute_dtype}:
                cos, sin = model._rope(positions, dtype)  # [1, 1, N, hd]
                self.rope_tables[dtype] = (cos[0, 0], sin[0, 0])
        self.mods: torch.Tensor | None = None  # [steps, 2 * depth + 1, 1, 3 * De] fp32 when fold_time
        if shortcuts.fold_time:
            dev = model.action_in.weight.device
            with torch.no_grad():
                self.mods = torch.stack([model.time_modulations(torch.full((1,), t, device=dev)) for t in self.times])

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, 1, L, hd] for positions [B, L]: rows of the build-time tables with `rope_table`. A position of
        -1 (masked tokens before the first valid one, which nothing valid reads) takes row 0."""
        if dtype not in self.rope_tables:
            return self.model._rope(positions, dtype)
        cos, sin = self.rope_tables[dtype]
        rows = positions.clamp(min=0)
        return cos[rows][:, None], sin[rows][:, None]

    # ---------------------------------------------------------------------------------------------- stages

    def vision(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, N_kept, 3, 224, 224] -> image tokens [B, N_kept * 256, width] (compute dtype)."""
        return self.siglip(images)

    def prefill(
        self, img_tokens: torch.Tensor, img_mask: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> K, V [depth, B, KV, P (+ H with static_kv), hd] and the key mask [B, 1, P + H].

        img_mask [B, N_kept] bool; tokens / token_mask [B, Lb] (Lb = the prompt bucket).
        """
        m, cfg = self.model, self.cfg
        lang = m.llm.embed_tokens(tokens).to(img_tokens.dtype)  # [B, Lb, width]
        x = torch.cat([img_tokens, lang], dim=1).to(m.llm.compute_dtype)  # [B, P, width]
        pad = torch.cat([img_mask.repeat_interleave(cfg.num_patches, dim=1), token_mask], dim=1)  # [B, P]
        positions = torch.cumsum(pad.to(torch.int64), dim=1) - 1
        cos, sin = self._rope(positions, x.dtype)
        b, p = pad.shape
        h_act = cfg.action_horizon
        extra = h_act if self.s.static_kv else 0
        kv_shape = (cfg.depth, b, cfg.num_kv_heads, p + extra, cfg.head_dim)
        ks = torch.zeros(kv_shape, dtype=x.dtype, device=x.device)
        vs = torch.zeros(kv_shape, dtype=x.dtype, device=x.device)
        attend = self._prefix_attention(pad, cos, sin)
        last = cfg.depth - 1
        for i, (layer, proj) in enumerate(zip(m.llm.layers, self.llm, strict=True)):
            h = layer.attn_norm(x)
            q, k, v = proj.qkv(h)
            k = apply_rope(_heads(k, cfg.num_kv_heads, cfg.head_dim), cos, sin)
            v = _heads(v, cfg.num_kv_heads, cfg.head_dim)
            ks[i, :, :, :p] = k
            vs[i, :, :, :p] = v
            if i == last:
                break  # the last layer's output feeds nothing the actions use
            x = x + proj.attn.o_proj(attend(q, k, v, ks[i], vs[i]))
            x = x + proj.geglu(layer.mlp_norm(x))
        key_mask = torch.cat([pad, pad.new_ones(b, h_act)], dim=1)[:, None]  # [B, 1, P + H]
        return ks, vs, key_mask

    def _prefix_attention(self, pad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """The prefix attention the shortcuts pick, for pad [B, P] and the RoPE tables -> attend(q, k, v, k_cache,
        v_cache) -> [B, P, H * hd], with q [B, P, H * hd] before RoPE, k (rotated) and v [B, KV, P, hd] and this
        layer's caches [B, KV, >= P, hd] holding them."""
        cfg = self.cfg
        scale = cfg.head_dim**-0.5
        triton_ok = _triton_ok(pad)
        pad_u8 = pad.to(torch.uint8) if triton_ok else pad  # the kernels' mask, converted once for all layers
        if self.s.triton_prefix and triton_ok:
            from pi05eval.kernels import prefix_attention_triton as pa

            tiles, b, p = pa.TILES, *pad.shape
            scratch = None
            if tiles["split"] > 1:
                shape = (b, p, cfg.num_heads, cfg.head_dim, tiles["block_m"], tiles["split"], pad.device)
                scratch = pa.PrefixAttentionScratch(*shape)
            kw = {**tiles, "scratch": scratch}
            return lambda q, k, v, kc, vc: pa.prefix_attention(q, kc, vc, pad_u8, scale, cos, sin, **kw)

        def rotated(q: torch.Tensor) -> torch.Tensor:
            return apply_rope(_heads(q, cfg.num_heads, cfg.head_dim), cos, sin)  # [B, H, P, hd]

        if self.s.triton_softmax and triton_ok and not self.s.sdpa_prefix:
            from pi05eval.kernels.softmax_triton import attention_masked_softmax

            return lambda q, k, v, kc, vc: attention_masked_softmax(rotated(q), k, v, pad_u8, scale)
        mask = pad[:, None, :] & pad[:, :, None]  # [B, P, P]
        if self.s.sdpa_prefix:
            mask = mask | torch.eye(pad.shape[1], dtype=torch.bool, device=pad.device)  # pad rows: self only
            return lambda q, k, v, kc, vc: sdpa_attention(rotated(q), k, v, mask)
        return lambda q, k, v, kc, vc: attention(rotated(q), k, v, mask, scale)

    def denoise(
        self, noise: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, key_mask: torch.Tensor, update=None
    ) -> torch.Tensor:
        """noise [B, H, action_dim] fp32 -> actions [B, H, action_dim] fp32 after all Euler steps.

        `update` replaces `self.update` (the compile engine passes its compiled version); the action tokens' RoPE
        tables are computed once per call.
        """
        m = self.model
        update = update or self.update
        b, h_act, _ = noise.shape
        lengths = key_mask[:, 0, : key_mask.shape[-1] - h_act].sum(dim=1)  # [B] valid prefix tokens
        positions = lengths[:, None] + torch.arange(h_act, device=noise.device)  # [B, H]
        cos, sin = self._rope(positions, m.expert.compute_dtype)
        x = noise.float()
        for i, t in enumerate(self.times):
            if self.mods is not None:
                mods = self.mods[i]  # [2 * depth + 1, 1, 3 * De]
            else:
                mods = m.time_modulations(torch.full((b,), t, dtype=torch.float32, device=noise.device))
            x = update(x, mods, cos, sin, ks, vs, key_mask)
        return x

    def update(self, x, mods, cos, sin, ks, vs, key_mask) -> torch.Tensor:
        """One Euler step: x_t [B, H, A] fp32 -> x_{t+dt}."""
        return x + self.dt * self._velocity(x, mods, cos, sin, ks, vs, key_mask)

    def _velocity(self, x, mods, cos, sin, ks, vs, key_mask) -> torch.Tensor:
        """One expert pass: x_t [B, H, A] fp32 -> v_t [B, H, A] fp32."""
        m, cfg = self.model, self.cfg
        h = m.action_in(x).to(m.expert.compute_dtype)  # [B, H, De]
        p_len = ks.shape[3] - (h.shape[1] if self.s.static_kv else 0)
        for i, (layer, proj) in enumerate(zip(m.expert.layers, self.expert, strict=True)):
            hn, gate = layer.attn_norm(h, mods[2 * i])
            q, k, v = proj.qkv(hn)
            q = apply_rope(_heads(q, cfg.num_heads, cfg.head_dim), cos, sin)
            k = apply_rope(_heads(k, cfg.num_kv_heads, cfg.head_dim), cos, sin)
            v = _heads(v, cfg.num_kv_heads, cfg.head_dim)
            if self.s.static_kv:
                ks[i, :, :, p_len:] = k
                vs[i, :, :, p_len:] = v
                k_all, v_all = ks[i], vs[i]
            else:
                k_all, v_all = torch.cat([ks[i], k], dim=2), torch.cat([vs[i], v], dim=2)
            att = attention(q, k_all, v_all, key_mask, cfg.head_dim**-0.5)
            h = h + proj.attn.o_proj(att) * gate
            hn, gate = layer.mlp_norm(h, mods[2 * i + 1])
            h = h + proj.geglu(hn) * gate
        y, _ = m.expert.norm(h, mods[-1])
        return m.action_out(y.float())

    # ---------------------------------------------------------------------------------------------- host side

    def select_inputs(
        self,
        images: torch.Tensor,
        image_masks: torch.Tensor,
        tokens: torch.Tensor,
        token_mask: torch.Tensor,
        bucket: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Apply `trim_prefix` from HOST masks: keep image slots any batch element uses and the first `bucket`
        prompt tokens (callers pick a bucket ≥ the longest valid prompt). Without trimming: inputs unchanged."""
        if not self.s.trim_prefix:
            return images, image_masks, tokens, token_mask
        keep = image_masks.cpu().any(dim=0).nonzero().flatten().tolist()
        if keep and keep == list(range(keep[0], keep[-1] + 1)):  # consecutive slots: views, no copies
            slots = slice(keep[0], keep[-1] + 1)
            return images[:, slots], image_masks[:, slots], tokens[:, :bucket], token_mask[:, :bucket]
        return images[:, keep], image_masks[:, keep], tokens[:, :bucket], token_mask[:, :bucket]

    @torch.no_grad()
    def sample(self, images, image_masks, tokens, token_mask, noise) -> torch.Tensor:
        """Same signature and result as `Pi05Model.sample_actions` (with this object's num_steps)."""
        bucket = int(token_mask.cpu().sum(dim=1).max()) if self.s.trim_prefix else tokens.shape[1]
        images, image_masks, tokens, token_mask = self.select_inputs(images, image_masks, tokens, token_mask, bucket)
        ks, vs, key_mask = self.prefill(self.vision(images), image_masks, tokens, token_mask)
        return self.denoise(noise, ks, vs, key_mask)
