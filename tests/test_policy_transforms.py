"""Pi0.5 transforms and tokenizer: the SPEC-pi05.md §6–§7 formulas against hand-computed numbers."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from pi05eval.policy.tokenizer import PromptTokenizer, clean_prompt, discretize_state, pi05_prompt_text
from pi05eval.policy.transforms import (
    Compose,
    ImagesToFloat,
    LiberoInputs,
    LiberoOutputs,
    Normalize,
    NormStats,
    PadStatesAndActions,
    TokenizePrompt,
    ToTensors,
    Unnormalize,
    image_to_float,
    normalize,
    unnormalize,
)

REPO = Path(__file__).resolve().parents[1]
STATS = NormStats(
    mean=np.array([1.0, 0.0]), std=np.array([2.0, 0.5]), q01=np.array([0.0, -2.0]), q99=np.array([1.0, 2.0])
)


def _load_script():
    spec = importlib.util.spec_from_file_location("make_tiny_policy", REPO / "scripts" / "make_tiny_policy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle's SentencePiece model (trained on the LIBERO instructions by the script)."""
    script = _load_script()
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    path.write_bytes(script.train_tokenizer(script.libero_instructions()))
    return path


# ------------------------------------------------------------------------------------------- normalization
def test_quantile_normalize_matches_formula() -> None:
    # (x − q01)/(q99 − q01 + 1e-6)·2 − 1 by hand: 0.25/1.000001·2 − 1 and 3/4.000001·2 − 1
    got = normalize(np.array([0.25, 1.0]), STATS, "quantile")
    np.testing.assert_allclose(got, [-0.5000004999995, 0.4999996250000937], rtol=0, atol=1e-12)


def test_quantile_unnormalize_matches_formula_and_passes_extra_dims() -> None:
    # (x + 1)/2·(q99 − q01 + 1e-6) + q01: −1 → q01, +1 → q99 + 1e-6; the third dim has no stats: unchanged
    got = unnormalize(np.array([[-1.0, 1.0, 0.5]]), STATS, "quantile")
    np.testing.assert_allclose(got, [[0.0, 2.000001, 0.5]], rtol=0, atol=1e-12)


def test_zscore_matches_formula() -> None:
    # (5 − 1)/(2 + 1e-6) and back: 1.9999990000005·(2 + 1e-6) + 1
    got = normalize(np.array([5.0]), STATS, "zscore")
    np.testing.assert_allclose(got, [1.9999990000005], rtol=0, atol=1e-12)
    np.testing.assert_allclose(unnormalize(got, STATS, "zscore"), [5.0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["quantile", "zscore"])
def test_normalize_round_trip(mode: str) -> None:
    x = np.random.default_rng(0).normal(size=(10, 2))
    np.testing.assert_allclose(unnormalize(normalize(x, STATS, mode), STATS, mode), x, atol=1e-12)


def test_normalize_rejects_more_dims_than_stats_and_missing_quantiles() -> None:
    with pytest.raises(ValueError, match="3 dims with 2-dim"):
        normalize(np.zeros(3), STATS, "quantile")
    no_q = NormStats(mean=np.zeros(2), std=np.ones(2))
    with pytest.raises(ValueError, match="q01 and q99"):
        normalize(np.zeros(2), no_q, "quantile")
    with pytest.raises(ValueError, match="choices: quantile, zscore"):
        normalize(np.zeros(2), STATS, "minmax")


def test_norm_stats_from_dict_checks_lengths() -> None:
    st = NormStats.from_dict({"mean": [0, 1], "std": [1, 1], "q01": [0, 0], "q99": [1, 1]})
    assert st.dim == 2 and st.to_dict()["q99"] == [1.0, 1.0]
    with pytest.raises(ValueError, match="different lengths"):
        NormStats.from_dict({"mean": [0, 1], "std": [1]})
    with pytest.raises(ValueError, match="missing"):
        NormStats.from_dict({"mean": [0]})


def test_normalize_and_unnormalize_transforms_touch_only_their_keys() -> None:
    data = {"state": np.array([0.25, 1.0]), "other": np.array([7.0])}
    out = Normalize({"state": STATS})(data)
    np.testing.assert_allclose(out["state"], [-0.5000004999995, 0.4999996250000937], atol=1e-12)
    assert out["other"] is data["other"]
    actions = np.zeros((10, 32))  # model output: 2 dims unnormalized (0 → (q01 + q99 + 1e-6)/2), 30 pass through
    got = Compose((Unnormalize({"actions": STATS}), LiberoOutputs(action_dim=7)))({"actions": actions})["actions"]
    assert got.shape == (10, 7)
    np.testing.assert_allclose(got[0], [0.5000005, 5e-7, 0, 0, 0, 0, 0], atol=1e-12)


# ------------------------------------------------------------------------------------------- images, layout
def test_libero_inputs_right_wrist_is_zeros_and_masked() -> None:
    img = np.random.default_rng(1).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    wrist = img[::-1].copy()
    out = LiberoInputs()({"image": img, "wrist_image": wrist, "state": np.zeros(8), "prompt": "x"})
    assert list(out["images"]) == ["base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb"]
    assert out["images"]["base_0_rgb"] is img and out["images"]["left_wrist_0_rgb"] is wrist
    right = out["images"]["right_wrist_0_rgb"]
    assert right.shape == img.shape and right.dtype == np.uint8 and not right.any()
    assert out["image_masks"] == {"base_0_rgb": True, "left_wrist_0_rgb": True, "right_wrist_0_rgb": False}
    assert "image" not in out and out["prompt"] == "x"


def test_image_to_float_scales_and_moves_channels_first() -> None:
    img = np.zeros((224, 224, 3), dtype=np.uint8)
    img[0, 0] = (0, 128, 255)
    img[5, 7, 2] = 51
    out = image_to_float(img)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    # x/255·2 − 1: 0 → −1, 128 → 0.00392157, 255 → 1, 51 → −0.6
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([-1.0, 0.0039215686, 1.0]), rtol=0, atol=1e-7)
    assert out[2, 5, 7].item() == pytest.approx(-0.6, abs=1e-7)
    assert out[2, 5, 8].item() == -1.0
    with pytest.raises(ValueError, match="uint8"):
        image_to_float(img.astype(np.float32))
    with pytest.raises(ValueError, match="224, 224, 3"):
        image_to_float(np.zeros((256, 256, 3), dtype=np.uint8))


def test_pad_state_and_to_tensors() -> None:
    data = PadStatesAndActions(32)({"state": np.arange(8.0), "actions": np.ones((10, 7))})
    assert data["state"].shape == (32,) and data["actions"].shape == (10, 32)
    np.testing.assert_array_equal(data["state"][:8], np.arange(8.0))
    assert not data["state"][8:].any() and not data["actions"][:, 7:].any()
    with pytest.raises(ValueError, match="more than the model's 32"):
        PadStatesAndActions(32)({"state": np.zeros(33)})
    img = np.full((224, 224, 3), 255, dtype=np.uint8)
    batch = {"images": {"base_0_rgb": img}, "image_masks": {"base_0_rgb": True}, "state": data["state"]}
    batch |= {"tokens": np.arange(4), "token_mask": np.array([1, 1, 0, 0], dtype=bool)}
    t = ImagesToFloat()(ToTensors("cpu")(batch))
    assert t["images"]["base_0_rgb"].shape == (1, 3, 224, 224) and bool((t["images"]["base_0_rgb"] == 1).all())
    assert t["state"].shape == (1, 32) and t["state"].dtype == torch.float32
    assert t["tokens"].dtype == torch.int64 and t["token_mask"].tolist() == [[True, True, False, False]]
    assert t["image_masks"]["base_0_rgb"].tolist() == [True]


# ------------------------------------------------------------------------------------------- tokenizer
def test_clean_prompt() -> None:
    assert clean_prompt("  put_the bowl\non the plate \n") == "put the bowl on the plate"
    assert clean_prompt("Open The Drawer") == "Open The Drawer"  # no lowercasing


def test_pi0_format_ids_match_direct_sentencepiece(sp_model: Path) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = PromptTokenizer(sp_model, max_len=200, prompt_format="pi0")
    prompt = " pick up the black_bowl and place it on the plate\n"
    expected = sp.encode("pick up the black bowl and place it on the plate", add_bos=True) + sp.encode("\n")
    out = tok(prompt)
    assert expected[0] == 2 and len(sp.encode("\n")) == 1  # <bos>; "\n" is one piece
    assert out.num_tokens == len(expected) and not out.truncated
    assert out.tokens.tolist() == expected + [0] * (200 - len(expected))
    assert out.mask.tolist() == [True] * len(expected) + [False] * (200 - len(expected))
    assert out.tokens.dtype == np.int64


def test_pi05_format_discretizes_state(sp_model: Path) -> None:
    import sentencepiece as spm

    # 256 bins over [-1, 1]: −1 → 0, 0 → 128, 0.999 → 255, 1.0 → 255, −0.99 → 1 (edge −0.9921875)
    assert discretize_state(np.array([-1.0, 0.0, 0.999, 1.0, -0.99])).tolist() == [0, 128, 255, 255, 1]
    text = pi05_prompt_text("open_the drawer", np.array([-1.0, 0.0, 0.999]))
    assert text == "Task: open the drawer, State: 0 128 255;\nAction: "
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    out = PromptTokenizer(sp_model, prompt_format="pi05")("open_the drawer", np.array([-1.0, 0.0, 0.999]))
    assert out.tokens[: out.num_tokens].tolist() == sp.encode(text, add_bos=True)
    with pytest.raises(ValueError, match="pass state"):
        PromptTokenizer(sp_model, prompt_format="pi05")("open the drawer")


def test_truncation_warns_and_is_reported(sp_model: Path, caplog: pytest.LogCaptureFixture) -> None:
    tok = PromptTokenizer(sp_model, max_len=6)
    full = tok.encode_ids("pick up the black bowl and place it on the plate")
    with caplog.at_level(logging.WARNING, logger="pi05eval.policy.tokenizer"):
        out = tok("pick up the black bowl and place it on the plate")
    assert out.truncated and out.num_tokens == 6 and out.full_length == len(full) > 6
    assert out.tokens.tolist() == full[:6] and out.mask.all()
    assert "truncated" in caplog.text
    short = tok("open")
    assert not short.truncated


def test_tokenize_prompt_transform_reports_truncation(sp_model: Path) -> None:
    out = TokenizePrompt(PromptTokenizer(sp_model, max_len=4))({"prompt": "turn on the stove", "state": np.zeros(8)})
    assert out["prompt_truncated"] and out["tokens"].shape == (4,) and "prompt" not in out
    with pytest.raises(ValueError, match="choices: pi0, pi05"):
        PromptTokenizer(sp_model, prompt_format="fast")
