"""The denoise step of the fast path (`FastPi05.update`) as Triton kernels: 5 per expert layer, 2 per step.

Same math as `FastPi05.update` (fold_time, fused Q/K/V and gate/up weights) up to fp32 summation order and the
rounding of attention probabilities before normalization; the residual stream, GEMM outputs, gelu and gated
branches are rounded to the activation dtype where PyTorch rounds them. Launches per step (M = B * H rows):

0. `action_in_kernel`            h = round(x @ W_in.T + b_in) into the residual buffer (fp32 math).
per expert layer:
1. `norm_gemm_kernel` (ROPE)     attention adaRMS (mean of squares recomputed per program) + fused QKV GEMM + RoPE on
                                 q and k -> qkv [M, (H + 2 KV) hd]; optionally split-K (the last program of a tile
                                 sums the partials, then applies RoPE). Weight rows pair-interleaved at build time so a
                                 tile holds both halves (d, d + hd/2) of the rotated columns.
2. `attention_kernel`            8 heads x H tokens (one row set per K/V head) over [prefix K/V | action K/V] with the
                                 key mask, fp32 softmax; keys split over programs, the last one combines -> att.
3. `gemm_residual_kernel` (O)    split-K O projection; the last program of a tile sums the partials and applies
                                 h += round(o) * gate in place.
4. `norm_gemm_kernel` (GEGLU)    MLP adaRMS + gate|up GEMM (rows interleaved gate j, up j) + gelu_tanh(gate) * up.
5. `gemm_residual_kernel` (down) split-K down projection + gated residual, as 3.
6. `step_out_kernel`             final adaRMS norm + action_out (fp32) + Euler update x + dt * v.

With `ExpertKernelConfig.cuda_chain`, launches 3-5 of a layer and 1 of the next run as one persistent CUDA launch
(`kernels/chain_cuda.py`; measured slower than these kernels so far, off by default).

With `pdl` (Hopper) every launch is a programmatic dependent launch: it loads its weights while the previous kernel
finishes, then waits for it. No host syncs and no allocations that depend on GPU values, so `update` can be
captured in a CUDA graph; scratch buffers are allocated per (batch, prefix length) on first use or by `prepare`.
Kernels compile on their first call: run a step before capturing. Do not wrap `update` in torch.compile. With
`static_kv` the action part of the K/V buffers is neither read nor written (the kernels read the action K/V from
their own qkv buffer). Extra memory: the re-laid Q/K/V and gate/up weights (~400 MB for Pi0.5 in bf16), and with
`ExpertKernelConfig.tma` every expert weight once more, re-laid in TMA boxes (~620 MB).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from pi05eval.engines.fast import FastPi05
from pi05eval.kernels import (
    NORM_BLOCK_M,
    AttentionScratch,
    ExpertKernelConfig,
    block_m,
    interleave_gate_up,
    interleave_halves,
    launch_action_in,
    launch_attention,
    launch_gemm_residual,
    launch_norm_gemm,
    launch_step_out,
    resolve,
)
from pi05eval.kernels.atomic_triton import launch_gemm_accumulate, launch_residual_norm_gemm
from pi05eval.kernels.chain_cuda import ChainShape, ExpertChain, unavailable_reason
from pi05eval.kernels.stream_triton import launch_gemm_residual_stream, launch_norm_gemm_stream
from pi05eval.kernels.tma_triton import TmaWeight, launch_gemm_residual_tma, launch_norm_gemm_tma

log = logging.getLogger(__name__)

KERNELS = frozenset({"qkv", "attn", "o", "gu", "down"})  # the launches of one expert layer
KERNELS_PER_LAYER = len(KERNELS)
KERNELS_PER_STEP = 2  # action_in, final norm + action_out + Euler


class _Scratch:
    """Activations, partials and counters for one (batch, prefix length) shape."""

    def __init__(self, td: TritonDenoise, batch: int, prefix_len: int) -> None:
        cfg, c, dev, dt = td.cfg, td.config, td.device, td.dtype
        m = batch * cfg.action_horizon
        d = cfg.expert_width
        self.h = torch.empty(m, d, dtype=dt, device=dev)  # residual stream [M, De]
        self.qkv = torch.empty(m, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim, dtype=dt, device=dev)
        self.att = torch.empty(m, cfg.num_heads * cfg.head_dim, dtype=dt, device=dev)  # [M, H * hd]
        self.act = torch.empty(m, cfg.expert_mlp_dim, dtype=dt, device=dev)  # gelu(gate) * up [M, mlp]
        bm = block_m(m)
        # split-K partials and arrival counters, shared by the GEMM launches (each resets its counters);
        # per launch: (split, rows per program, output columns, columns per program)
        rows_norm = block_m(m, NORM_BLOCK_M)
        gemms = [
            (c.qkv_split, rows_norm, self.qkv.shape[1], c.qkv_bn),
            (c.gu_split, rows_norm, 2 * cfg.expert_mlp_dim, c.gu_bn),
            (c.o_split, bm, d, c.o_bn),
            (c.down_split, bm, d, c.down_bn),
        ]
        ws = max([split * -(-m // rows) * rows * n for split, rows, n, _ in gemms if split > 1] + [1])
        self.ws = torch.empty(ws, dtype=torch.float32, device=dev)
        tiles = max(-(-m // rows) * n // bn for _, rows, n, bn in gemms)
        self.counters = torch.zeros(tiles, dtype=torch.int32, device=dev)
        self.attn = AttentionScratch(
            batch, prefix_len, cfg.action_horizon, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            c.att_bm, c.att_bs, c.att_dsplit, dev,
        )  # fmt: skip
        if c.atomic_residual:  # the second residual buffer and the O / down accumulators [M, De] fp32
            self.h_mid = torch.empty_like(self.h)
            self.acc_o = torch.zeros(m, d, dtype=torch.float32, device=dev)
            self.acc_down = torch.zeros_like(self.acc_o)


class TritonDenoise:
    """`update(x, mods, cos, sin, ks, vs, key_mask)`: `FastPi05.update` as Triton kernels."""

    def __init__(self, fast: FastPi05, config: ExpertKernelConfig | None = None) -> None:
        if not fast.s.fold_time or fast.mods is None:
            raise ValueError("TritonDenoise needs FastPi05 with fold_time=True (per-step adaRMS tables)")
        if any(p.wqkv is None or p.wgu is None for p in fast.expert):
            raise ValueError(
                "TritonDenoise needs the fused float weights of FastPi05 (fuse_qkv=True, fuse_gate_up=True, no "
                "quantized expert layers)"
            )
        model = fast.model
        self.dtype = model.expert.compute_dtype
        for layer, p in zip(model.expert.layers, fast.expert, strict=True):
            o_w, down_w = getattr(layer.attn.o_proj, "weight", None), getattr(layer.mlp.down_proj, "weight", None)
            weights = (p.wqkv, p.wgu, o_w, down_w)
            if any(not isinstance(w, torch.Tensor) or w.dtype != self.dtype for w in weights):
                raise ValueError(
                    f"TritonDenoise needs plain {self.dtype} expert weights (o_proj / down_proj quantized?)"
                )
        heads = (model.action_in, model.action_out)
        if any(h.weight.dtype != torch.float32 or h.bias is None for h in heads):
            raise ValueError(
                "TritonDenoise needs fp32 action_in / action_out with biases (as set_precision keeps them)"
            )
        self.fast, self.model, self.cfg, self.dt = fast, model, fast.cfg, fast.dt
        self.horizon = fast.cfg.action_horizon
        self.device = model.action_in.weight.device
        self.eps = float(model.expert.layers[0].attn_norm.eps)
        cfg = self.cfg
        with torch.no_grad():  # weights [N, K] row-major in the activation dtype
            self.wqkv = [interleave_halves(p.wqkv.detach(), cfg.head_dim) for p in fast.expert]
            self.wgu = [interleave_gate_up(p.wgu.detach()) for p in fast.expert]
            self.wo = [layer.attn.o_proj.weight.detach().contiguous() for layer in model.expert.layers]
            self.wd = [layer.mlp.down_proj.weight.detach().contiguous() for layer in model.expert.layers]
            self.w_in, self.b_in = model.action_in.weight.detach(), model.action_in.bias.detach()  # [De, A], [De]
            self.w_out, self.b_out = model.action_out.weight.detach(), model.action_out.bias.detach()  # [A, De], [A]
        self._chains: dict[ChainShape, ExpertChain] = {}  # shared by with_config copies
        self.config = self._resolve(config or ExpertKernelConfig())
        self._scratch: dict[tuple[int, int], _Scratch] = {}
        log.info("TritonDenoise: %d layers x %d kernels + %d, %s", cfg.depth, KERNELS_PER_LAYER, KERNELS_PER_STEP,
                 self.config)  # fmt: skip

    def _resolve(self, config: ExpertKernelConfig) -> ExpertKernelConfig:
        cfg = self.cfg
        out = resolve(config, cfg.expert_width, cfg.expert_mlp_dim, cfg.num_heads * cfg.head_dim, cfg.head_dim)
        if cfg.action_dim % 16:
            raise ValueError(f"action_dim {cfg.action_dim} is not a multiple of 16")
        dev = self.device
        hopper = dev.type == "cuda" and torch.cuda.get_device_capability(dev)[0] >= 9
        self.pdl = out.pdl and hopper
        if (out.prefetch or out.att_prefetch) and (out.stream or out.tma):
            raise ValueError("prefetch is not implemented for the stream or TMA kernels (stream=True, tma=True)")
        if out.tma and (out.stream or out.qkv_split != 1 or out.gu_split != 1):
            raise ValueError("tma=True needs stream=False and whole-row norm kernels (qkv_split = gu_split = 1)")
        if out.tma and dev.type == "cuda" and not hopper:
            raise ValueError("tma=True needs a Hopper or newer GPU (TMA copies)")
        if out.atomic_residual and (out.stream or out.tma or out.prefetch or out.att_prefetch):
            raise ValueError("atomic_residual=True is not implemented with stream, tma or prefetch")
        if out.atomic_residual and (out.qkv_split != 1 or out.gu_split != 1):
            raise ValueError("atomic_residual=True needs whole-row norm kernels (qkv_split = gu_split = 1)")
        if out.cuda_chain and (out.stream or out.tma or out.atomic_residual or out.prefetch or out.att_prefetch):
            raise ValueError("cuda_chain=True is not implemented with stream, tma, atomic_residual or prefetch")
        if out.cuda_chain and (reason := unavailable_reason(dev)):
            raise RuntimeError(f"cuda_chain=True: the CUDA expert chain cannot run here: {reason}")
        # (kernel, layer) -> its launcher's prefetch arguments; bulk L2 prefetch is an sm_90 instruction
        self._prefetch = self._prefetch_schedule(out, hopper)
        # the GEMM launchers of this config, their weights and design-specific arguments per kernel
        self._weights = {"qkv": self.wqkv, "o": self.wo, "gu": self.wgu, "down": self.wd}
        if out.tma:
            self._gemm_launchers = (_tma_norm_gemm, _tma_gemm_residual)
            self._weights = {
                k: [TmaWeight(w, getattr(out, f"{k}_bn"), getattr(out, f"{k}_split"), getattr(out, f"{k}_bk"))
                    for w in self._weights[k]]
                for k in ("qkv", "o", "gu", "down")
            }  # fmt: skip
            self._gemm_tiles = {k: {} for k in ("qkv", "o", "gu", "down")}
        elif out.stream:
            self._gemm_launchers = (launch_norm_gemm_stream, launch_gemm_residual_stream)
            self._gemm_tiles = {
                k: {"bk": getattr(out, f"{k}_bk"), "stages": out.stages, "swap": out.swap}
                for k in ("qkv", "o", "gu", "down")
            }
        else:
            self._gemm_launchers = (launch_norm_gemm, launch_gemm_residual)
            self._gemm_tiles = {
                "qkv": {"mod_late": out.mod_late},
                "gu": {"mod_late": out.mod_late},
                "o": {},
                "down": {},
            }
        return out

    def with_config(self, config: ExpertKernelConfig) -> TritonDenoise:
        """A copy with other tile sizes, sharing the re-laid weights (for tuning sweeps)."""
        other = object.__new__(TritonDenoise)
        other.__dict__.update(self.__dict__)
        other.config = other._resolve(config)
        other._scratch = {}
        return other

    def config_dict(self) -> dict[str, int | bool]:
        return dataclasses.asdict(self.config)

    def prepare(self, batch: int, prefix_alloc: int) -> None:
        """Allocate the scratch of a (batch, ks.shape[3]) shape now instead of on the first `update`."""
        self._buffers(batch, prefix_alloc)

    def _buffers(self, batch: int, prefix_alloc: int) -> _Scratch:
        key = (batch, prefix_alloc)
        if key not in self._scratch:
            prefix_len = prefix_alloc - (self.horizon if self.fast.s.static_kv else 0)
            self._scratch[key] = _Scratch(self, batch, prefix_len)
        return self._scratch[key]

    @torch.no_grad()
    def update(
        self,
        x: torch.Tensor,
        mods: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        ks: torch.Tensor,
        vs: torch.Tensor,
        key_mask: torch.Tensor,
    ) -> torch.Tensor:
        """One Euler step: x_t [B, H, A] fp32 -> x_{t+dt} (a new tensor); arguments as `FastPi05.update`.

        mods [2 * depth + 1, 1, 3 * De] fp32 (one step's adaRMS table); cos, sin [B, 1, H, hd];
        ks, vs [depth, B, KV, P (+ H with static_kv), hd]; key_mask [B, 1, P + H] bool.
        """
        x = x.float().contiguous()
        mods = mods if mods.dtype == torch.float32 and mods.stride(-1) == 1 else mods.float().contiguous()
        h = self.run_layers(x, mods, cos, sin, ks, vs, key_mask)
        out = torch.empty_like(x)
        c = self.config
        pending = None
        if c.atomic_residual:  # the last down projection's gated residual, still in its accumulator
            acc = self._buffers(x.shape[0], ks.shape[3]).acc_down
            pending = (acc, mods[2 * self.cfg.depth - 1, 0, 2 * h.shape[1] :])
        launch_step_out(
            h, mods[-1, 0], self.w_out, self.b_out, x.view(-1, x.shape[-1]), out.view(-1, x.shape[-1]),
            eps=self.eps, dt=self.dt, mod_late=c.mod_late, pdl=self.pdl, pending=pending,
        )  # fmt: skip
        return out

    def _prefetch_schedule(
        self, c: ExpertKernelConfig, on: bool
    ) -> dict[tuple[str, int], dict[str, torch.Tensor | int]]:
        """(kernel, layer) -> its launcher's prefetch arguments (all empty unless `on`). In the step's GEMM sequence
        qkv, o, gu, down of layer 0, 1, ... (wrapping to the next step's layer 0), each GEMM kernel fetches the weight
        `prefetch` GEMMs later and the attention kernel the weight `att_prefetch` GEMMs after it (1: its layer's O)."""
        gemms = [(k, i) for i in range(self.cfg.depth) for k in ("qkv", "o", "gu", "down")]
        weights = {"qkv": self.wqkv, "o": self.wo, "gu": self.wgu, "down": self.wd}

        def fetch(j: int) -> dict[str, torch.Tensor | int]:
            k, i = gemms[j % len(gemms)]
            return {"prefetch": weights[k][i], "prefetch_at": c.prefetch_at}

        out = {key: fetch(j + c.prefetch) if on and c.prefetch else {} for j, key in enumerate(gemms)}
        for j, (k, i) in enumerate(gemms):
            if k == "o":
                out["attn", i] = fetch(j + c.att_prefetch - 1) if on and c.att_prefetch else {}
        return out

    @torch.no_grad()
    def run_layers(
        self,
        x: torch.Tensor,
        mods: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        ks: torch.Tensor,
        vs: torch.Tensor,
        key_mask: torch.Tensor,
        kernels: frozenset[str] = KERNELS,
    ) -> torch.Tensor:
        """action_in, then every expert layer -> the residual stream [M, De] (a buffer reused by the next call; with
        `atomic_residual`, without the last down projection's gated residual, still pending in `acc_down`).

        x [B, H, A] fp32 contiguous; `kernels` restricts the layer launches to some of KERNELS (timing sweeps only:
        the result is then meaningless).
        """
        cfg, c = self.cfg, self.config
        b, horizon, _ = x.shape
        if horizon != self.horizon or cos.stride(-1) != 1 or ks.stride(-1) != 1 or vs.stride() != ks.stride():
            raise ValueError("unexpected layout: x [B, H, A], cos/sin and ks/vs contiguous in their last dimension")
        if mods.shape[1] != 1:
            raise ValueError("TritonDenoise needs adaRMS tables shared by the batch: mods [2 * depth + 1, 1, 3 * De]")
        sc = self._buffers(b, ks.shape[3])
        prefix_len = ks.shape[3] - (horizon if self.fast.s.static_kv else 0)
        d, hd, heads, kv = cfg.expert_width, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        pdl, tiles = self.pdl, self._gemm_tiles
        norm_gemm, gemm_residual = self._gemm_launchers
        pf, wts = self._prefetch, self._weights
        if c.cuda_chain:
            launch_action_in(x.view(-1, x.shape[-1]), self.w_in, self.b_in, sc.h, bn=c.io_bn, pdl=pdl)
            self._chain_layers(sc, mods, cos, sin, ks, vs, key_mask, prefix_len, kernels)
            return sc.h
        if c.atomic_residual:
            launch_action_in(x.view(-1, x.shape[-1]), self.w_in, self.b_in, sc.h, bn=c.io_bn, pdl=pdl, zero=sc.acc_o)
            self._atomic_layers(sc, mods, cos, sin, ks, vs, key_mask, prefix_len, kernels)
            return sc.h
        launch_action_in(x.view(-1, x.shape[-1]), self.w_in, self.b_in, sc.h, bn=c.io_bn, pdl=pdl)
        for i in range(cfg.depth):
            mod_attn, mod_mlp = mods[2 * i, 0], mods[2 * i + 1, 0]  # [3 * De]: scale | shift | gate
            if "qkv" in kernels:
                norm_gemm(
                    sc.h, mod_attn, wts["qkv"][i], sc.qkv, sc.ws, sc.counters, horizon=horizon, eps=self.eps,
                    bn=c.qkv_bn, split=c.qkv_split, warps=c.qkv_warps, pdl=pdl, cos=cos, sin=sin, head_dim=hd,
                    rope_cols=(heads + kv) * hd, **tiles["qkv"], **pf["qkv", i],
                )  # fmt: skip
            if "attn" in kernels:
                self._attention(sc, ks[i], vs[i], key_mask, prefix_len, **pf["attn", i])
            if "o" in kernels:
                gemm_residual(
                    sc.att, wts["o"][i], sc.h, mod_attn[2 * d :], sc.ws, sc.counters, bn=c.o_bn, split=c.o_split,
                    warps=c.o_warps, pdl=pdl, **tiles["o"], **pf["o", i],
                )  # fmt: skip
            if "gu" in kernels:
                norm_gemm(
                    sc.h, mod_mlp, wts["gu"][i], sc.act, sc.ws, sc.counters, horizon=horizon, eps=self.eps,
                    bn=c.gu_bn, split=c.gu_split, warps=c.gu_warps, pdl=pdl, **tiles["gu"], **pf["gu", i],
                )  # fmt: skip
            if "down" in kernels:
                gemm_residual(
                    sc.act, wts["down"][i], sc.h, mod_mlp[2 * d :], sc.ws, sc.counters, bn=c.down_bn,
                    split=c.down_split, warps=c.down_warps, pdl=pdl, **tiles["down"], **pf["down", i],
                )  # fmt: skip
        return sc.h

    def _attention(
        self, sc: _Scratch, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, prefix_len: int, **prefetch: Any
    ) -> None:
        """One layer's attention launch: sc.qkv over [this layer's prefix K/V k, v | the action K/V] -> sc.att."""
        cfg, c = self.cfg, self.config
        launch_attention(
            sc.qkv, k, v, key_mask, sc.att, sc.attn, prefix_len=prefix_len, horizon=self.horizon,
            heads=cfg.num_heads, kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, scale=cfg.head_dim**-0.5,
            bm=c.att_bm, bs=c.att_bs, dsplit=c.att_dsplit, warps=c.att_warps, pdl=self.pdl, **prefetch,
        )  # fmt: skip

    def chain(self, batch: int) -> ExpertChain:
        """The CUDA expert chain of `batch` (built on first use: fragment-ordered weights, NVRTC compile)."""
        cfg = self.cfg
        shape = ChainShape(
            cfg.expert_width, cfg.expert_mlp_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            batch * self.horizon, self.horizon, torch.cuda.get_device_properties(self.device).multi_processor_count,
            splits=self.config.chain_splits,
        )  # fmt: skip
        if shape not in self._chains:
            self._chains[shape] = ExpertChain(self.wqkv, self.wo, self.wgu, self.wd, shape, self.eps)
        return self._chains[shape]

    def _chain_layers(
        self, sc: _Scratch, mods: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ks: torch.Tensor,
        vs: torch.Tensor, key_mask: torch.Tensor, prefix_len: int, kernels: frozenset[str],
    ) -> None:  # fmt: skip
        """The expert layers of `run_layers` with `cuda_chain`: the chain's Q/K/V of layer 0, then per layer the
        attention and one chain launch (O, gate|up, down of that layer and Q/K/V of the next)."""
        chain = self.chain(cos.shape[0])
        tables = mods.reshape(mods.shape[0], -1)  # [2 depth + 1, 3 De]
        depth = self.cfg.depth
        chain.launch(-1, 0, tables, sc.h, sc.att, sc.act, sc.qkv, cos, sin)
        for i in range(depth):
            if "attn" in kernels:
                self._attention(sc, ks[i], vs[i], key_mask, prefix_len)
            chain.launch(i, i + 1 if i + 1 < depth else -1, tables, sc.h, sc.att, sc.act, sc.qkv, cos, sin)

    def _atomic_layers(
        self, sc: _Scratch, mods: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ks: torch.Tensor,
        vs: torch.Tensor, key_mask: torch.Tensor, prefix_len: int, kernels: frozenset[str],
    ) -> None:  # fmt: skip
        """The expert layers of `run_layers` with `atomic_residual`: O and down add into acc_o / acc_down, the next
        norm kernel applies their gated residual (Q/K/V: sc.h -> sc.h_mid, gate|up: sc.h_mid -> sc.h)."""
        cfg, c, pdl = self.cfg, self.config, self.pdl
        d, hd, heads, kv = cfg.expert_width, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        for i in range(cfg.depth):
            mod_attn, mod_mlp = mods[2 * i, 0], mods[2 * i + 1, 0]  # [3 * De]: scale | shift | gate
            if "qkv" in kernels:
                pending = (sc.acc_down, mods[2 * i - 1, 0, 2 * d :]) if i else None  # the previous layer's MLP
                launch_residual_norm_gemm(
                    sc.h, pending, sc.h_mid, mod_attn, self.wqkv[i], sc.qkv, horizon=self.horizon, eps=self.eps,
                    bn=c.qkv_bn, warps=c.qkv_warps, pdl=pdl, cos=cos, sin=sin, head_dim=hd, rope_cols=(heads + kv) * hd,
                )  # fmt: skip
            if "attn" in kernels:
                self._attention(sc, ks[i], vs[i], key_mask, prefix_len)
            if "o" in kernels:
                launch_gemm_accumulate(
                    sc.att, self.wo[i], sc.acc_o, sc.acc_down, bn=c.o_bn, split=c.o_split, warps=c.o_warps, pdl=pdl
                )
            if "gu" in kernels:
                launch_residual_norm_gemm(
                    sc.h_mid, (sc.acc_o, mod_attn[2 * d :]), sc.h, mod_mlp, self.wgu[i], sc.act, horizon=self.horizon,
                    eps=self.eps, bn=c.gu_bn, warps=c.gu_warps, pdl=pdl,
                )  # fmt: skip
            if "down" in kernels:
                launch_gemm_accumulate(
                    sc.act, self.wd[i], sc.acc_down, sc.acc_o, bn=c.down_bn, split=c.down_split, warps=c.down_warps,
                    pdl=pdl,
                )  # fmt: skip


def _tma_norm_gemm(
    h: torch.Tensor, mod: torch.Tensor, w: TmaWeight, out: torch.Tensor, ws: torch.Tensor, counters: torch.Tensor,
    *, bn: int, split: int, **kw: Any,
) -> None:  # fmt: skip
    """`launch_norm_gemm_tma` behind `launch_norm_gemm`'s signature (tiles are the re-laid weight's; no split-K)."""
    launch_norm_gemm_tma(h, mod, w, out, **kw)


def _tma_gemm_residual(
    a: torch.Tensor, w: TmaWeight, h: torch.Tensor, gate: torch.Tensor, ws: torch.Tensor, counters: torch.Tensor,
    *, bn: int, split: int, **kw: Any,
) -> None:  # fmt: skip
    """`launch_gemm_residual_tma` behind `launch_gemm_residual`'s signature (tiles are the re-laid weight's)."""
    launch_gemm_residual_tma(a, w, h, gate, ws, counters, **kw)
