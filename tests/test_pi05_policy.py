"""The Pi0.5 policy end to end on the tiny offline bundle (CPU): shapes, determinism, the pipeline, clear errors."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file, save_file

from pi05eval.engines.tensorrt import MissingBackendError
from pi05eval.policy.base import ActionChunk, Observation, Policy, TaskInfo
from pi05eval.policy.pi05 import Pi05Policy, build_pi05_policy, dummy_observation
from pi05eval.policy.tokenizer import PromptTokenizer

REPO = Path(__file__).resolve().parents[1]
PROMPT = "put the black bowl on the plate"


@pytest.fixture(autouse=True)
def _no_home_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PI05EVAL_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def policy(tiny: Path) -> Pi05Policy:
    return build_pi05_policy("tiny", tiny, precision="fp32", device="cpu", seed=0)


def _obs(prompt: str = PROMPT, seed: int = 0) -> Observation:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    wrist = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    state = np.array([-0.05, 0.03, 0.8, 3.0, -0.2, -0.1, 0.03, -0.03])
    return Observation(image=img, wrist_image=wrist, state=state, prompt=prompt)


def _twin(p: Pi05Policy, seed: int) -> Pi05Policy:
    """Another policy on the same loaded model (fresh noise stream)."""
    return Pi05Policy(
        "twin", p.model, p.tokenizer, p.norm_stats, action_horizon=p.action_horizon, num_steps=p.num_steps, seed=seed
    )


def test_infer_returns_finite_chunk(policy: Pi05Policy) -> None:
    assert isinstance(policy, Policy) and not policy.needs_privileged and not policy.uses_cuda
    chunk = policy.infer(_obs())
    assert isinstance(chunk, ActionChunk)
    assert chunk.actions.shape == (10, 7) and np.isfinite(chunk.actions).all()
    assert set(chunk.stage_ms) == {"preprocess", "model", "postprocess"}
    assert chunk.info == {"prompt_truncated": False, "prompt_tokens": len(policy.tokenizer.encode_ids(PROMPT))}


def test_same_seed_same_actions_and_warmup_leaves_the_noise_stream(policy: Pi05Policy) -> None:
    a, b = _twin(policy, seed=3), _twin(policy, seed=3)
    first, second = a.infer(_obs()).actions, a.infer(_obs()).actions
    assert not np.allclose(first, second)  # fresh noise per call
    assert b.warmup() > 0
    np.testing.assert_array_equal(b.infer(_obs()).actions, first)
    a.reseed(5)  # per-episode reseeding restarts the stream
    assert torch.equal(a.sample_noise(), _twin(policy, seed=5).sample_noise())


def test_pipeline_matches_hand_built_model_inputs(policy: Pi05Policy, tiny: Path) -> None:
    """Policy == model.sample_actions on hand-made inputs (SPEC §6–§7), then the quantile unnormalize formula."""
    obs, noise = _obs(seed=1), torch.randn(1, 10, 32, generator=torch.Generator().manual_seed(7))
    got = policy.infer(obs, noise=noise).actions

    sp = spm.SentencePieceProcessor(model_file=str(tiny / "tokenizer.model"))
    ids = sp.encode(PROMPT, add_bos=True) + sp.encode("\n")
    tokens = torch.zeros(1, 200, dtype=torch.int64)
    tokens[0, : len(ids)] = torch.tensor(ids)
    base = torch.from_numpy(obs.image).permute(2, 0, 1).float() / 255 * 2 - 1
    wrist = torch.from_numpy(obs.wrist_image).permute(2, 0, 1).float() / 255 * 2 - 1
    images = torch.stack([base, wrist, -torch.ones_like(base)])[None]  # masked slot: uint8 zeros → −1
    masks = torch.tensor([[True, True, False]])
    raw = policy.model.sample_actions(images, masks, tokens, tokens != 0, noise, num_steps=10)[0].numpy()
    stats = policy.norm_stats["actions"]
    want = (raw[:, :7] + 1) / 2 * (stats.q99 - stats.q01 + 1e-6) + stats.q01
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_warmup_builds_only_the_buckets_of_the_checked_tasks(tiny: Path) -> None:
    """The warm-up call uses a task's own instruction: no engine bucket is built that the run's prompts never use."""
    p = build_pi05_policy("tiny_compile", tiny, precision="fp32", device="cpu", engine="compile", engine_options={
        "compile": False, "buckets": [32, 64]})  # fmt: skip
    long_prompt = "pick up the black bowl between the plate and the ramekin and place it on the plate"
    p.check_task(TaskInfo("libero_spatial", 0, long_prompt, ()))
    assert 32 < p.tokenizer(long_prompt).num_tokens <= 64
    assert p.tokenizer(dummy_observation().prompt).num_tokens <= 32  # the default warm-up prompt: bucket 32
    p.warmup()
    assert [bucket for bucket, _ in p.engine.graphs] == [64]


def test_long_prompt_is_truncated_and_reported(policy: Pi05Policy, caplog: pytest.LogCaptureFixture) -> None:
    prompt = " ".join(["pick up the black bowl and place it on the plate"] * 30)
    with caplog.at_level(logging.WARNING):
        chunk = policy.infer(_obs(prompt))
    assert chunk.info["prompt_truncated"] and chunk.info["prompt_tokens"] > 200
    assert np.isfinite(chunk.actions).all() and "truncated" in caplog.text
    policy.check_task(TaskInfo("libero_spatial", 0, prompt, goal=()))
    assert caplog.text.count("truncated") >= 2  # check_task warns before any simulation too


def test_bf16_with_pi05_prompt_format(tiny: Path) -> None:
    p = build_pi05_policy("tiny_bf16", tiny, precision="bf16", device="cpu", prompt_format="pi05")
    chunk = p.infer(_obs())
    assert chunk.actions.shape == (10, 7) and np.isfinite(chunk.actions).all()
    pi0_len = len(PromptTokenizer(tiny / "tokenizer.model").encode_ids(PROMPT))
    assert chunk.info["prompt_tokens"] > pi0_len + 8  # "Task: …, State: 8 bins;\nAction: "


def test_nan_weights_raise_a_clear_error(tiny: Path, tmp_path: Path) -> None:
    root = tmp_path / "nan"
    shutil.copytree(tiny, root)
    tensors = load_file(str(root / "model.safetensors"))
    tensors["action_out_proj.bias"] = torch.full_like(tensors["action_out_proj.bias"], float("nan"))
    save_file(tensors, str(root / "model.safetensors"))
    p = build_pi05_policy("nan", root, precision="fp32", device="cpu")
    with pytest.raises(ValueError, match="non-finite actions"):
        p.infer(_obs())


def test_bad_choices_fail_before_loading(tmp_path: Path) -> None:
    absent = tmp_path / "absent"  # never reached: the choices are checked first
    with pytest.raises(MissingBackendError, match=r'pip install "pi05eval\[tensorrt\]"'):  # not installable here
        build_pi05_policy("x", absent, engine="tensorrt")
    with pytest.raises(ValueError, match="choices: eager, compile, tensorrt"):
        build_pi05_policy("x", absent, engine="eagre")
    with pytest.raises(ValueError, match="as a single word must be one of bf16, fp32"):
        build_pi05_policy("x", absent, precision="fp8")
    with pytest.raises(ValueError, match="choices: quantile, zscore"):
        build_pi05_policy("x", absent, norm="minmax")
    with pytest.raises(ValueError, match="num_steps"):
        build_pi05_policy("x", absent, num_steps=0)


@pytest.mark.gpu
def test_cuda_policy_matches_cpu(policy: Pi05Policy, tiny: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    gpu = build_pi05_policy("tiny_cuda", tiny, precision="fp32", device="cuda")
    assert gpu.uses_cuda and gpu.warmup() > 0
    noise = torch.randn(1, 10, 32, generator=torch.Generator().manual_seed(11))
    got = gpu.infer(_obs(), noise=noise).actions
    np.testing.assert_allclose(got, policy.infer(_obs(), noise=noise).actions, rtol=0, atol=2e-3)
    bf16 = build_pi05_policy("tiny_cuda_bf16", tiny, precision="bf16", device="auto")
    assert bf16.device.type == "cuda" and np.isfinite(bf16.infer(_obs()).actions).all()
