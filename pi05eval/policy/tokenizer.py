"""Prompt tokenization for Pi0.5 (SentencePiece, PaliGemma conventions; SPEC-pi05.md §6).

Two prompt formats:
* ``"pi0"`` (what pi05_libero was trained with, ``discrete_state_input=False``): ``<bos> cleaned-prompt`` followed by
  the tokens of ``"\\n"``; the robot state is not part of the prompt.
* ``"pi05"`` (discrete state input, lerobot's pi05): ``<bos> "Task: {prompt}, State: {bins};\\nAction: "`` where
  ``bins`` are the normalized, unpadded state values discretized into 256 bins over [-1, 1].

The ids are padded with 0 (mask False) to ``max_len``; a longer prompt is truncated with a logged warning and the
truncation is reported in `TokenizedPrompt.truncated`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

logger = logging.getLogger(__name__)

PromptFormat = Literal["pi0", "pi05"]
PROMPT_FORMATS: tuple[str, ...] = ("pi0", "pi05")
PAD_ID = 0  # PaliGemma <pad>; also what openpi pads the prompt with
STATE_BINS = 256


@dataclass(frozen=True)
class TokenizedPrompt:
    """One prompt as the model consumes it."""

    tokens: np.ndarray  # [max_len] int64, PAD_ID after the valid tokens
    mask: np.ndarray  # [max_len] bool, True on valid tokens
    num_tokens: int  # valid tokens kept (≤ max_len)
    truncated: bool  # the full prompt had more than max_len tokens
    full_length: int  # tokens of the full prompt before truncation


def clean_prompt(prompt: str) -> str:
    """openpi's prompt cleaning: strip, underscores and newlines to spaces (no lowercasing)."""
    return prompt.strip().replace("_", " ").replace("\n", " ")


def discretize_state(state: np.ndarray) -> np.ndarray:
    """Normalized state in [-1, 1] -> ints in [0, 255] (256 equal bins).

    As in openpi, nothing is clipped: values ≥ 1 land in bin 255 and values below -1 give -1.
    """
    edges = np.linspace(-1.0, 1.0, STATE_BINS + 1)[:-1]  # [256] left edges
    return np.digitize(np.asarray(state, dtype=np.float64), edges) - 1


def pi05_prompt_text(prompt: str, state: np.ndarray) -> str:
    """The pi05 discrete-state prompt text (before tokenization)."""
    bins = " ".join(str(int(b)) for b in discretize_state(state))
    return f"Task: {clean_prompt(prompt)}, State: {bins};\nAction: "


class PromptTokenizer:
    """SentencePiece tokenizer producing fixed-length, masked token ids in one of the `PROMPT_FORMATS`."""

    def __init__(self, model_path: str | Path, max_len: int = 200, prompt_format: PromptFormat = "pi0") -> None:
        import sentencepiece

        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"unknown prompt_format {prompt_format!r}; choices: {', '.join(PROMPT_FORMATS)}")
        if max_len < 1:
            raise ValueError(f"max_len must be positive, got {max_len}")
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece model not found: {path}")
        self.model_path = path
        self.max_len = max_len
        self.prompt_format: PromptFormat = prompt_format
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self._newline_ids: list[int] = list(self._sp.encode("\n"))

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    def encode_ids(self, prompt: str, state: np.ndarray | None = None) -> list[int]:
        """The prompt's full token ids (no padding, no truncation)."""
        if self.prompt_format == "pi0":
            return list(self._sp.encode(clean_prompt(prompt), add_bos=True)) + self._newline_ids
        if state is None:
            raise ValueError("prompt_format 'pi05' puts the normalized state into the prompt: pass state")
        return list(self._sp.encode(pi05_prompt_text(prompt, state), add_bos=True))

    def __call__(self, prompt: str, state: np.ndarray | None = None) -> TokenizedPrompt:
        ids = self.encode_ids(prompt, state)
        full = len(ids)
        truncated = full > self.max_len
        if truncated:
            logger.warning(
                "prompt has %d tokens, more than max_len=%d: truncated to the first %d (%r)",
                full,
                self.max_len,
                self.max_len,
                prompt,
            )
            ids = ids[: self.max_len]
        tokens = np.full(self.max_len, PAD_ID, dtype=np.int64)  # [max_len]
        tokens[: len(ids)] = ids
        mask = np.zeros(self.max_len, dtype=bool)  # [max_len]
        mask[: len(ids)] = True
        return TokenizedPrompt(tokens=tokens, mask=mask, num_tokens=len(ids), truncated=truncated, full_length=full)
