"""Pi0.5 architecture config, the variant table, and per-call cost accounting (FLOPs and bytes).

`pi05` is openpi's pi05_libero model (SigLIP So400m/14 + Gemma-2B prefix LLM + Gemma-300M action expert);
`tiny` is exactly the config of the openpi reference vectors in `shared/vectors/pi05_tiny_openpi`.
The cost model counts matmul FLOPs (2 per multiply-add) and the bytes of weights and KV cache one call reads,
in the spirit of nanoGPT's `estimate_mfu`; the benchmark divides them by measured time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Pi05Config:
    # --- SigLIP vision tower (one per image, weights shared across images)
    image_size: int = 224  # input resolution, square
    patch_size: int = 14  # conv patch embedding; (224 / 14)^2 = 256 tokens per image
    vision_width: int = 1152  # SigLIP hidden size
    vision_depth: int = 27  # SigLIP encoder layers
    vision_mlp_dim: int = 4304  # SigLIP MLP hidden size (fc1 out)
    vision_heads: int = 16  # SigLIP attention heads (MHA, head_dim = width / heads)
    vision_ln_eps: float = 1e-6  # SigLIP LayerNorm epsilon
    # --- Gemma prefix LLM (PaliGemma) and the action expert; they share depth and attention geometry
    width: int = 2048  # prefix LLM hidden size (the projector maps vision_width -> width)
    mlp_dim: int = 16384  # prefix LLM GeGLU hidden size
    expert_width: int = 1024  # action expert hidden size (also the time-conditioning width)
    expert_mlp_dim: int = 4096  # action expert GeGLU hidden size
    depth: int = 18  # layers of both the LLM and the expert (joint attention pairs layer i with layer i)
    num_heads: int = 8  # query heads of both
    num_kv_heads: int = 1  # key/value heads of both (1 = multi-query attention)
    head_dim: int = 256  # per-head size of both
    vocab_size: int = 257152  # token embedding rows (PaliGemma SentencePiece); override for small tokenizers
    rms_eps: float = 1e-6  # RMSNorm / adaRMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base
    # openpi's PyTorch bf16 mode rounds the RoPE inverse frequencies to bf16 (an HF buffer hit by `.to(bf16)`);
    # True reproduces that (bit-exact to openpi in bf16), False keeps exact fp32 frequencies (as openpi's JAX model).
    # No effect in fp32 mode.
    rope_freqs_in_compute_dtype: bool = True
    # --- action head and sampler inputs
    action_dim: int = 32  # model action width (LIBERO's 7 are zero-padded to 32)
    action_horizon: int = 10  # actions per chunk = expert tokens per denoise step
    max_token_len: int = 200  # prompt tokens (padded) in the prefix
    num_images: int = 3  # camera slots: base, left wrist, right wrist
    time_min_period: float = 4e-3  # sin/cos time embedding: shortest period
    time_max_period: float = 4.0  # sin/cos time embedding: longest period

    def __post_init__(self) -> None:
        checks = {
            "image_size % patch_size == 0": self.image_size % self.patch_size == 0,
            "vision_width % vision_heads == 0": self.vision_width % self.vision_heads == 0,
            "num_heads % num_kv_heads == 0": self.num_heads % self.num_kv_heads == 0,
            "head_dim even (RoPE)": self.head_dim % 2 == 0,
            "expert_width even (time embedding)": self.expert_width % 2 == 0,
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"invalid Pi05Config: {', '.join(failed)}")

    @property
    def num_patches(self) -> int:
        """Vision tokens per image."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def vision_head_dim(self) -> int:
        return self.vision_width // self.vision_heads

    @property
    def prefix_len(self) -> int:
        """Untrimmed prefix length: all image tokens plus the padded prompt (968 for pi05)."""
        return self.num_images * self.num_patches + self.max_token_len


VARIANTS: dict[str, Pi05Config] = {
    "pi05": Pi05Config(),
    # openpi gemma "dummy" for both experts + the shrunk SigLIP of the reference vectors (config.json there).
    "tiny": Pi05Config(
        vision_width=128,
        vision_depth=2,
        vision_mlp_dim=256,
        vision_heads=4,
        width=64,
        mlp_dim=128,
        expert_width=64,
        expert_mlp_dim=128,
        depth=4,
        num_heads=8,
        num_kv_heads=1,
        head_dim=16,
    ),
}


def get_config(name: str, **overrides: object) -> Pi05Config:
    """A variant from `VARIANTS` with fields replaced, e.g. `get_config("tiny", vocab_size=1024)`."""
    if name not in VARIANTS:
        raise ValueError(f"unknown Pi0.5 variant {name!r}; choices: {sorted(VARIANTS)}")
    fields = {f.name for f in dataclasses.fields(Pi05Config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown Pi05Config field(s) {unknown}; fields: {sorted(fields)}")
    return dataclasses.replace(VARIANTS[name], **overrides)


# ------------------------------------------------------------------------------------------------ cost accounting


def vision_params(cfg: Pi05Config) -> int:
    """SigLIP parameters (patch + position embedding, encoder, final LayerNorm); projector excluded."""
    d, f = cfg.vision_width, cfg.vision_mlp_dim
    layer = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 4 * d  # qkvo + fc1 + fc2 + two LayerNorms
    embed = d * 3 * cfg.patch_size**2 + d + cfg.num_patches * d
    return embed + cfg.vision_depth * layer + 2 * d


def _attn_params(width: int, cfg: Pi05Config) -> int:
    q = cfg.num_heads * cfg.head_dim
    kv = cfg.num_kv_heads * cfg.head_dim
    return width * q + 2 * width * kv + q * width


def llm_layer_params(cfg: Pi05Config) -> int:
    """One prefix-LLM layer: attention, GeGLU, two RMSNorm scales."""
    return _attn_params(cfg.width, cfg) + 3 * cfg.width * cfg.mlp_dim + 2 * cfg.width


def expert_layer_params(cfg: Pi05Config, *, include_adarms: bool = True) -> int:
    """One expert layer; the two adaRMS modulation Dense layers (d -> 3d) optionally."""
    d = cfg.expert_width
    adarms = 2 * (d * 3 * d + 3 * d) if include_adarms else 0
    return _attn_params(d, cfg) + 3 * d * cfg.expert_mlp_dim + adarms


def param_count(cfg: Pi05Config) -> int:
    """All parameters of `Pi05Model(cfg)` (the tied embedding once; no unused expert lm_head)."""
    de = cfg.expert_width
    projector = cfg.vision_width * cfg.width + cfg.width
    llm = cfg.vocab_size * cfg.width + cfg.depth * llm_layer_params(cfg) + cfg.width
    expert = cfg.depth * expert_layer_params(cfg) + (de * 3 * de + 3 * de)
    heads = 2 * cfg.action_dim * de + de + cfg.action_dim + 2 * (de * de + de)  # action in/out, time MLP
    return vision_params(cfg) + projector + llm + expert + heads


@dataclass(frozen=True)
class CallCost:
    """FLOPs and bytes read by one `sample_actions` call, per stage (batch included)."""

    vision_flops: float
    prefill_flops: float
    denoise_flops: float  # all steps
    vision_bytes: float  # weights read once
    prefill_bytes: float  # weights read once (+ the KV cache written)
    denoise_bytes: float  # all steps: expert weights + time/adaRMS weights + KV cache re-read each step
    detail: dict[str, float] = field(default_factory=dict)

    @property
    def total_flops(self) -> float:
        return self.vision_flops + self.prefill_flops + self.denoise_flops

    @property
    def total_bytes(self) -> float:
        return self.vision_bytes + self.prefill_bytes + self.denoise_bytes


def _attention_flops(cfg: Pi05Config, queries: int, keys: int) -> float:
    return 2.0 * 2.0 * queries * keys * cfg.num_heads * cfg.head_dim  # QK^T and PV


def estimate_call_cost(
    cfg: Pi05Config,
    *,
    num_images: int | None = None,
    prefix_len: int | None = None,
    num_steps: int = 10,
    batch: int = 1,
    weight_bytes: float = 2.0,
    fp32_bytes: float = 4.0,
) -> CallCost:
    """Matmul FLOPs and bytes of one call; `num_images`/`prefix_len` below the config's = a trimmed prefix.

    `weight_bytes` is the storage size of the bf16 (or quantized) weights; adaRMS, time MLP and action
    projections stay fp32 (`fp32_bytes`). Elementwise work (norms, softmax, RoPE) is not counted.
    """
    n_img = cfg.num_images if num_images is None else num_images
    p = cfg.prefix_len if prefix_len is None else prefix_len
    t, h = cfg.num_patches, cfg.action_horizon
    dv, de = cfg.vision_width, cfg.expert_width

    v_layer_mm = vision_params(cfg) - (cfg.num_patches * dv) - 2 * dv  # weights that multiply every token
    vision = 2.0 * n_img * t * (v_layer_mm + cfg.vision_width * cfg.width)
    vision += n_img * cfg.vision_depth * 2.0 * 2.0 * t * t * dv
    prefill = 2.0 * p * cfg.depth * llm_layer_params(cfg) + cfg.depth * _attention_flops(cfg, p, p)
    step_mm = 2.0 * h * (cfg.depth * expert_layer_params(cfg, include_adarms=False) + 2 * cfg.action_dim * de)
    step_cond = 2.0 * ((2 * cfg.depth + 1) * 3 * de * de + 2 * de * de)  # adaRMS Dense + time MLP, 1 row
    step = step_mm + step_cond + cfg.depth * _attention_flops(cfg, h, p + h)

    kv_bytes = cfg.depth * 2 * p * cfg.num_kv_heads * cfg.head_dim * weight_bytes * batch
    cond_params = (2 * cfg.depth + 1) * (3 * de * de + 3 * de) + 2 * (de * de + de)  # adaRMS Dense + time MLP
    expert_bytes = cfg.depth * expert_layer_params(cfg, include_adarms=False) * weight_bytes
    expert_bytes += 2 * cfg.action_dim * de * fp32_bytes  # action in/out projections (fp32)
    return CallCost(
        vision_flops=batch * vision,
        prefill_flops=batch * prefill,
        denoise_flops=batch * num_steps * step,
        vision_bytes=(vision_params(cfg) + cfg.vision_width * cfg.width) * weight_bytes,
        prefill_bytes=cfg.depth * llm_layer_params(cfg) * weight_bytes + kv_bytes,
        denoise_bytes=num_steps * (expert_bytes + cond_params * fp32_bytes + kv_bytes),
        detail={
            "prefix_len": float(p),
            "num_images": float(n_img),
            "step_flops": batch * step,
            "expert_weight_bytes_per_step": float(expert_bytes),
            "time_cond_bytes_per_step": float(cond_params * fp32_bytes),  # foldable: depends on t only
            "kv_bytes_per_step": float(kv_bytes),
        },
    )
