"""The CUDA expert chain (`chain_cuda`, `expert_chain.cu`): its weight layout and tiling on CPU, its kernel on a
Hopper GPU against the Triton denoise and the fp32 fast path."""

from __future__ import annotations

import importlib.util
import itertools

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton is not installed (pip install triton): pi05eval.kernels imports it", allow_module_level=True)

import triton_interpreter as interp

from pi05eval.bench import random_model
from pi05eval.engines.fast import FastPi05

# pi05eval.kernels imports Triton: with its interpreter on (no GPU), as the kernel tests expect of the first import
_SET_HERE = interp.turn_on()
from pi05eval.kernels.chain_cuda import (  # noqa: E402
    ChainShape,
    fragment_order,
    max_tiles,
    tile_range,
    unavailable_reason,
)

interp.turn_off(_SET_HERE)

PI05 = {"width": 1024, "mlp": 4096, "heads": 8, "kv_heads": 1, "head_dim": 256, "rows": 10, "horizon": 10}


def test_fragment_order_gives_each_lane_its_mma_operands() -> None:
    """Lane 4 g + t of tile j, chunk c holds B[k, n] = W[n, k] at n = 8 j + g, for the two k16 steps of the chunk:
    k = 32 c + 2 t + {0, 1} and + 8 (first MMA), then + 16 and + 24 (second), as PTX's m16n8k16 B fragment."""
    n, k = 24, 64
    w = torch.arange(n * k, dtype=torch.float32).view(n, k)
    frag = fragment_order(w)
    assert frag.shape == (n // 8, k // 32, 32, 8)
    for j in range(n // 8):
        for c in range(k // 32):
            for lane in range(32):
                g, t = divmod(lane, 4)
                ks = [32 * c + 8 * q + 2 * t + e for q in range(4) for e in range(2)]
                assert frag[j, c, lane].tolist() == w[8 * j + g, ks].tolist()
    # every element exactly once
    assert sorted(frag.flatten().tolist()) == w.flatten().tolist()
    with pytest.raises(ValueError, match="multiple of 8"):
        fragment_order(torch.zeros(12, 64))


def test_tiles_are_split_over_blocks_without_gaps() -> None:
    for tiles, blocks in [(320, 132), (128, 132), (1024, 132), (20, 7)]:
        ranges = [tile_range(b, tiles, blocks) for b in range(blocks)]
        assert ranges[0][0] == 0 and ranges[-1][1] == tiles
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
        assert max_tiles(tiles, blocks) == -(-tiles // blocks)


def test_pi05_chain_fits_an_h200() -> None:
    shape = ChainShape(**PI05, blocks=132)
    shape.check()
    slot_a, slot_b, x = shape.smem()
    assert slot_a == 8 * 8 * 1024 * 2  # 8 gate|up tiles of one block
    assert slot_b == 8 * 4096 * 2  # one down tile
    assert slot_a >= 3 * 8 * 1024 * 2 + 10 * 4096 * 2  # the next Q/K/V tiles beside the staged down input
    assert x >= 10 * 1024 * 2
    assert shape.smem_bytes() <= 227 * 1024  # an H100 / H200 block's shared memory (opt-in)
    assert "-DS_GU=4" in shape.defines() and "-DMAXT_QKV=3" in shape.defines()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rows": 20}, "1 to 16"),
        ({"splits": (3, 8, 2, 8)}, "qkv: K 1024 does not split 3 ways"),
        ({"mlp": 4100}, "multiples of 64"),
        ({"blocks": 100}, "gu: 11 tiles per block need > 256 threads"),
        ({"blocks": 66, "warps": 16}, "shared memory"),  # 16 gate|up tiles of 16 KB per block
    ],
)
def test_shapes_it_cannot_run_are_refused(change, message) -> None:
    with pytest.raises(ValueError, match=message):
        ChainShape(**{**PI05, "blocks": 132, **change}).check()


def _prefix(cfg, prefix_len: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = (cfg.depth, 1, cfg.num_kv_heads, prefix_len, cfg.head_dim)
    ks, vs = torch.randn(shape, generator=g, device="cuda"), torch.randn(shape, generator=g, device="cuda")
    pad = torch.rand(1, prefix_len, generator=g, device="cuda") > 0.2
    key_mask = torch.cat([pad, pad.new_ones(1, cfg.action_horizon)], dim=1)[:, None]
    noise = torch.randn(1, cfg.action_horizon, cfg.action_dim, generator=g, device="cuda")
    return ks, vs, key_mask, noise


@pytest.mark.gpu
@pytest.mark.parametrize(
    "overrides",
    [{}, {"expert_width": 1024, "expert_mlp_dim": 4096, "head_dim": 256, "depth": 3}],
    ids=["tiny", "pi05_expert"],
)
def test_chain_matches_the_triton_denoise(overrides) -> None:
    """10 Euler steps with the chain kernel: as close to the fp32 fast path as the Triton denoise is (bf16)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if reason := unavailable_reason(torch.device("cuda")):
        pytest.skip(reason)
    from pi05eval.engines.triton_denoise import TritonDenoise
    from pi05eval.kernels import ExpertKernelConfig

    model = random_model("tiny", torch.device("cuda"), seed=5, overrides=overrides)
    ks, vs, key_mask, noise = _prefix(model.cfg, prefix_len=77, seed=1)
    with torch.no_grad():
        ref = FastPi05(model.set_precision("fp32"), 10).denoise(noise, ks, vs, key_mask)
        fast = FastPi05(model.set_precision("bf16"), 10)
        kb, vb = ks.bfloat16(), vs.bfloat16()
        tri = fast.denoise(noise, kb, vb, key_mask, update=TritonDenoise(fast).update)
        chain = TritonDenoise(fast, ExpertKernelConfig(cuda_chain=True))
        out = fast.denoise(noise, kb, vb, key_mask, update=chain.update)
        again = fast.denoise(noise, kb, vb, key_mask, update=chain.update)
    err_tri, err = (tri - ref).abs().max().item(), (out - ref).abs().max().item()
    assert torch.isfinite(out).all()
    assert err <= 1.5 * err_tri + 2e-3, f"chain {err:.2e} vs fp32, Triton {err_tri:.2e}"
    assert torch.equal(out, again)  # fixed summation order: bitwise repeatable
