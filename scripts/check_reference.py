#!/usr/bin/env python
"""Check pi05eval's Pi05Model against reference vectors produced by openpi (e.g. shared/vectors/pi05_tiny_openpi).

    python scripts/check_reference.py ../shared/vectors/pi05_tiny_openpi

DIR holds config.json, model.safetensors (openpi layout), inputs.safetensors, outputs.safetensors and optionally
outputs_jax.safetensors (format: that directory's README). The model is built from config.json, run in fp32 and in
bf16, and every reference tensor is compared; prints max |ours - reference| against its tolerance per tensor and
exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from pi05eval.model import VARIANTS, Pi05Config, Pi05Model, euler_schedule, load_pi05
from pi05eval.model.pi05 import time_embedding

IMAGE_KEYS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
RUN_NAME = re.compile(r"^(fp32|bf16)_steps(\d+)$")
# Reference internals this implementation has no tensor for (it never builds the suffix masks).
NOT_APPLICABLE = ("suffix_pad_masks", "suffix_att_masks")


@dataclass(frozen=True)
class Check:
    name: str
    err: float  # max abs error (mismatch count for bool tensors); inf for a shape mismatch
    tol: float

    @property
    def ok(self) -> bool:
        return self.err <= self.tol


def config_from_json(meta: dict) -> Pi05Config:
    """Pi05Config from the reference's config.json (its section names carry free text, matched by prefix)."""

    def section(prefix: str) -> dict:
        return next(v for k, v in meta.items() if k.startswith(prefix))

    llm, expert, vis = section("paligemma_llm"), section("action_expert"), section("siglip_vision")
    pc = meta["Pi0Config"]
    shared = ("depth", "num_heads", "num_kv_heads", "head_dim")
    if any(expert[k] != llm[k] for k in shared) or vis["projection_dim"] != llm["width"]:
        raise ValueError("reference config: expert/LLM geometry differ or projector does not map to the LLM width")
    time_emb = meta.get("time_embedding", {})
    return Pi05Config(
        image_size=vis["image_size"],
        patch_size=vis["patch_size"],
        vision_width=vis["hidden_size"],
        vision_depth=vis["num_hidden_layers"],
        vision_mlp_dim=vis["intermediate_size"],
        vision_heads=vis["num_attention_heads"],
        vision_ln_eps=vis["layer_norm_eps"],
        width=llm["width"],
        mlp_dim=llm["mlp_dim"],
        expert_width=expert["width"],
        expert_mlp_dim=expert["mlp_dim"],
        depth=llm["depth"],
        num_heads=llm["num_heads"],
        num_kv_heads=llm["num_kv_heads"],
        head_dim=llm["head_dim"],
        vocab_size=llm["vocab_size"],
        rms_eps=llm.get("rms_norm_eps", 1e-6),
        rope_theta=llm.get("rope_theta", 10000.0),
        action_dim=pc["action_dim"],
        action_horizon=pc["action_horizon"],
        max_token_len=pc["max_token_len"],
        time_min_period=time_emb.get("min_period", 4e-3),
        time_max_period=time_emb.get("max_period", 4.0),
    )


def load_inputs(directory: Path) -> dict[str, torch.Tensor]:
    raw = load_file(directory / "inputs.safetensors")
    return {
        "images": torch.stack([raw[f"images_float_bchw/{k}"] for k in IMAGE_KEYS], dim=1),  # [B, 3, 3, 224, 224]
        "image_masks": torch.stack([raw[f"image_masks/{k}"] for k in IMAGE_KEYS], dim=1),  # [B, 3]
        "tokens": raw["tokenized_prompt"],
        "token_mask": raw["tokenized_prompt_mask"],
        "noise": raw["noise"],
    }


def _capture(module: torch.nn.Module, store: dict[str, torch.Tensor], name: str) -> Callable[[], None]:
    """Record module's (first) output under `name` on every call; returns the hook's remover."""

    def hook(_mod: torch.nn.Module, _args: tuple, out: object) -> None:
        store[name] = (out[0] if isinstance(out, tuple) else out).detach().float()

    return module.register_forward_hook(hook).remove


def trace_prefix(model: Pi05Model, inp: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Prefix intermediates under the reference's names."""
    ours: dict[str, torch.Tensor] = {"siglip_last_hidden_state_base": model.vision(inp["images"][:, 0]).float()}
    embs, pad_mask, att_mask = model.embed_prefix(inp["images"], inp["image_masks"], inp["tokens"], inp["token_mask"])
    ours.update(prefix_embs=embs.float(), prefix_pad_masks=pad_mask, prefix_att_masks=att_mask)
    remove = _capture(model.llm.layers[0], ours, "prefix_layer0_out")
    ours["prefix_out"] = model.prefix_hidden(embs, pad_mask, att_mask).float()
    remove()
    cache = model.prefill(embs, pad_mask, att_mask)
    for i in range(cache.k.shape[0]):
        ours[f"kv_cache/layer{i}/k"], ours[f"kv_cache/layer{i}/v"] = cache.k[i].float(), cache.v[i].float()
    return ours


def trace_denoise(model: Pi05Model, inp: dict[str, torch.Tensor], num_steps: int) -> dict[str, torch.Tensor]:
    """Per-step intermediates of the Euler loop run stage by stage, plus `sample_actions`' result as `actions`."""
    embs, pad_mask, att_mask = model.embed_prefix(inp["images"], inp["image_masks"], inp["tokens"], inp["token_mask"])
    cache = model.prefill(embs, pad_mask, att_mask)
    times, dt = euler_schedule(num_steps)
    cfg, x, b = model.cfg, inp["noise"], inp["noise"].shape[0]
    ours: dict[str, torch.Tensor] = {}
    for i, t in enumerate(times):
        t_vec = torch.full((b,), t, dtype=torch.float32)
        step: dict[str, torch.Tensor] = {"timestep": t_vec, "x_t": x, "suffix_embs": model.action_in(x)}
        step["time_sincos"] = time_embedding(t_vec, cfg.expert_width, cfg.time_min_period, cfg.time_max_period)
        step["adarms_cond"] = model.time_conditioning(t_vec)
        removers = [
            _capture(model.expert.layers[0], step, "expert_layer0_out"),
            _capture(model.expert.norm, step, "suffix_out"),
        ]
        step["v_t"] = model.denoise_step(x, t_vec, cache)
        for remove in removers:
            remove()
        ours.update({f"step{i}/{k}": v.float() for k, v in step.items()})
        x = x + dt * step["v_t"]
    ours["actions"] = model.sample_actions(num_steps=num_steps, **inp)
    ours["actions_stagewise"] = x
    return ours


def compare(ours: torch.Tensor, ref: torch.Tensor) -> float:
    if ours.shape != ref.shape:
        return float("inf")
    if ref.dtype == torch.bool:
        return float((ours.bool() != ref).sum())
    return float((ours.float() - ref.float()).abs().max())


def run_checks(directory: Path, fp32_atol: float = 1e-4, bf16_atol: float = 2e-2) -> tuple[list[Check], list[str]]:
    """All checks for one reference directory -> (checks, reference keys that were not compared).

    fp32 runs are held to `fp32_atol` (timesteps and masks to exact equality); bf16 actions to `bf16_atol` and
    other bf16 tensors to `bf16_atol * max(1, max|ref|)` (a few bf16 ulps at the tensor's scale: bf16 GEMMs round
    differently on different CPUs/GPUs, so bit equality with openpi's bf16 run holds only on some machines).
    """
    torch.set_float32_matmul_precision("highest")
    cfg = config_from_json(json.loads((directory / "config.json").read_text()))
    inp = load_inputs(directory)
    refs = load_file(directory / "outputs.safetensors")
    runs = sorted({key.split("/")[0] for key in refs if RUN_NAME.match(key.split("/")[0])})
    models = {p: load_pi05(directory / "model.safetensors", cfg, precision=p) for p in ("fp32", "bf16")}
    prefix: dict[str, dict[str, torch.Tensor]] = {}
    checks: list[Check] = []
    compared: set[str] = set()
    with torch.no_grad():
        for run in runs:
            precision, steps = RUN_NAME.match(run).groups()
            if precision not in prefix:
                prefix[precision] = trace_prefix(models[precision], inp)
            ours = {**prefix[precision], **trace_denoise(models[precision], inp, int(steps))}
            for key in sorted(k for k in refs if k.startswith(run + "/")):
                name = key[len(run) + 1 :]
                if name in NOT_APPLICABLE:
                    continue
                tol = fp32_atol
                if precision == "bf16":
                    tol = bf16_atol * (1.0 if name == "actions" else max(1.0, float(refs[key].abs().max())))
                tol = 0.0 if name.endswith(("timestep", "masks")) else tol
                checks.append(Check(key, compare(ours[name], refs[key]) if name in ours else float("inf"), tol))
                compared.add(key)
                if name == "actions":  # the same loop run stage by stage, as an engine would call it
                    checks.append(Check(key + " (stages)", compare(ours["actions_stagewise"], refs[key]), tol))
            checks.extend(_jax_checks(directory, f"jax/{run}/actions", ours, fp32_atol))
    return checks, sorted(set(refs) - compared)


def _jax_checks(directory: Path, jax_key: str, ours: dict[str, torch.Tensor], atol: float) -> list[Check]:
    path = directory / "outputs_jax.safetensors"
    if not path.exists():
        return []
    jax = load_file(path)
    out = [Check(jax_key, compare(ours["actions"], jax[jax_key]), atol)] if jax_key in jax else []
    if jax_key.startswith("jax/fp32_steps10") and "jax/prefix_embs" in jax:
        out.append(Check("jax/prefix_embs", compare(ours["prefix_embs"], jax["jax/prefix_embs"]), atol))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--fp32-atol", type=float, default=1e-4)
    parser.add_argument("--bf16-atol", type=float, default=2e-2)
    args = parser.parse_args(argv)
    cfg = config_from_json(json.loads((args.directory / "config.json").read_text()))
    variant = next((name for name, v in VARIANTS.items() if v == cfg), None)
    print(f"config: {'variant ' + repr(variant) if variant else cfg}")
    checks, skipped = run_checks(args.directory, args.fp32_atol, args.bf16_atol)
    width = max(len(c.name) for c in checks)
    print(f"{'tensor':<{width}}  {'max|err|':>9}  {'tol':>8}  ok")
    for c in checks:
        print(f"{c.name:<{width}}  {c.err:9.2e}  {c.tol:8.1e}  {'ok' if c.ok else 'FAIL'}")
    failed = [c.name for c in checks if not c.ok]
    print(f"{len(checks)} checks, {len(failed)} failed; not compared: {skipped or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
