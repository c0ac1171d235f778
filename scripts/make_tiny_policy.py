"""Write a complete, offline Pi0.5 policy bundle with tiny random weights (for tests and smoke runs).

    python scripts/make_tiny_policy.py policies/tiny [--seed 0]

OUT receives the real formats, no network needed:
* ``tokenizer.model``: a SentencePiece model trained in-process on every LIBERO task instruction (PaliGemma's
  conventions: pad 0, eos 1, bos 2, unk 3, byte fallback, ``"\\n"`` as one piece),
* ``model.safetensors``: the ``tiny`` variant (vocab = that tokenizer's) with random weights, openpi's key layout,
* ``assets/physical-intelligence/libero/norm_stats.json``: plausible LIBERO statistics in openpi's layout,
* ``config.json``: ``{"variant": "tiny", "vocab_size": ...}``.
Same seed ⇒ same bytes. Takes a few seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import sys
from pathlib import Path

SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")
ASSET_ID = "physical-intelligence/libero"
SP_VOCAB_TARGET = 512  # upper bound; SentencePiece stops earlier on this small corpus (hard_vocab_limit off)

# Rounded from the statistics openpi computes on physical-intelligence/libero (state: eef pos, axis-angle, gripper
# qpos ×2; actions: OSC_POSE deltas + gripper). Plausible values for a test bundle, not a trained checkpoint's.
LIBERO_NORM_STATS = {
    "state": {
        "mean": [-0.0465, 0.0344, 0.7645, 2.9722, -0.2203, -0.1256, 0.0269, -0.0272],
        "std": [0.1049, 0.1518, 0.3785, 0.3443, 0.9070, 0.3254, 0.0142, 0.0141],
        "q01": [-0.3992, -0.2689, 0.0380, 1.5083, -2.7210, -1.0813, 0.0017, -0.0400],
        "q99": [0.1355, 0.3357, 1.2699, 3.2765, 2.4054, 0.5972, 0.0403, -0.0018],
    },
    "actions": {
        "mean": [0.0551, 0.0877, -0.0874, 0.0007, 0.0055, -0.0055, -0.0457],
        "std": [0.3318, 0.3758, 0.4481, 0.0393, 0.0636, 0.0786, 0.9990],
        "q01": [-0.7072, -0.7984, -0.9375, -0.1147, -0.1643, -0.2240, -1.0],
        "q99": [0.9371, 0.8678, 0.9371, 0.1316, 0.1917, 0.3374, 0.9996],
    },
}


def libero_instructions() -> list[str]:
    """Every distinct task instruction of the LIBERO suites, sorted."""
    from libero.libero import benchmark

    suites = benchmark.get_benchmark_dict()
    texts = set()
    for name in SUITES:
        suite = suites[name]()
        texts.update(suite.get_task(i).language for i in range(suite.n_tasks))
    return sorted(texts)


def train_tokenizer(sentences: list[str], vocab_size: int = SP_VOCAB_TARGET) -> bytes:
    """A serialized SentencePiece unigram model (deterministic: one thread, no shuffling)."""
    import sentencepiece as spm

    # Also the pieces of the pi05 prompt format ("Task: ..., State: 0 1 ... 255;\nAction: ").
    corpus = [*sentences, *(f"Task: {s}, State: {i} {255 - i};\nAction: " for i, s in enumerate(sentences))]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        byte_fallback=True,
        split_digits=True,
        user_defined_symbols=["\n"],
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return model.getvalue()


def randomize_(model, seed: int) -> None:
    """Overwrite every parameter from one seeded generator (independent of the modules' own init).

    Matrices N(0, 1/fan_in); biases N(0, 0.05²); LayerNorm scales 1 + N(0, 0.1²); other vectors (RMSNorm (1+w)
    scales) N(0, 0.1²). adaRMS modulation layers are random too, so the time conditioning matters.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        x = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        if param.ndim >= 2:
            x = x / math.sqrt(math.prod(param.shape[1:]))
        elif name.endswith("bias"):
            x = x * 0.05
        elif isinstance(owner, torch.nn.LayerNorm):
            x = 1.0 + 0.1 * x
        else:
            x = 0.1 * x
        with torch.no_grad():
            param.copy_(x)


def canonicalize_metadata(path: Path) -> None:
    """Sort the safetensors header's ``__metadata__`` keys in place (same length, same tensors).

    safetensors writes metadata from a hash map, so with two or more keys the byte order changes run to run; sorting
    makes the file byte-identical for the same weights.
    """
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8 : 8 + n]).get("__metadata__") or {}
    old = json.dumps({"__metadata__": meta}, separators=(",", ":"))[1:-1].encode()
    new = json.dumps({"__metadata__": dict(sorted(meta.items()))}, separators=(",", ":"))[1:-1].encode()
    at = raw.find(old, 8, 8 + n)
    if at < 0:
        raise RuntimeError(f"{path}: unexpected safetensors header layout")
    raw[at : at + len(old)] = new
    path.write_bytes(bytes(raw))


def make_tiny_policy(out: Path, seed: int = 0) -> dict[str, str]:
    """Write the bundle into `out`; returns {file: sha256}."""
    import sentencepiece as spm

    from pi05eval.model import Pi05Model, get_config
    from pi05eval.model.weights import save_openpi_layout

    out.mkdir(parents=True, exist_ok=True)
    sp_bytes = train_tokenizer(libero_instructions())
    (out / "tokenizer.model").write_bytes(sp_bytes)
    vocab = spm.SentencePieceProcessor(model_proto=sp_bytes).get_piece_size()

    cfg = get_config("tiny", vocab_size=vocab)
    model = Pi05Model(cfg)
    randomize_(model, seed)
    save_openpi_layout(model, out / "model.safetensors")
    canonicalize_metadata(out / "model.safetensors")

    stats_path = out / "assets" / ASSET_ID / "norm_stats.json"
    stats_path.parent.mkdir(parents=True, exist_ok=True)
    stats_path.write_text(json.dumps({"norm_stats": LIBERO_NORM_STATS}, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps({"variant": "tiny", "vocab_size": vocab}, indent=2) + "\n")
    files = [out / "tokenizer.model", out / "model.safetensors", stats_path, out / "config.json"]
    return {str(f.relative_to(out)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="bundle directory to write (created)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for name, digest in make_tiny_policy(args.out, args.seed).items():
        size = (args.out / name).stat().st_size
        print(f"{digest[:16]}  {size:>10,d}  {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
