"""Host side shared by the engines that build one set of programs per prompt-length bucket and kept image slots."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from pi05eval.engines.fast import FastPi05


class BucketedEngine:
    """Host side shared by engines that build one set of programs per (prompt bucket, kept image slots).

    Subclasses set `fast` (a FastPi05), `batch_size` and `buckets` (from `bucket_set`)."""

    fast: FastPi05
    batch_size: int
    buckets: tuple[int, ...]

    @staticmethod
    def bucket_set(requested: Iterable[int], max_len: int) -> tuple[int, ...]:
        """The requested prompt-length buckets below the model's max_token_len, plus max_token_len itself."""
        return tuple(sorted({b for b in requested if b < max_len} | {max_len}))

    def bucket_for(self, length: int) -> int:
        """The smallest bucket holding `length` valid prompt tokens (the full length without trimming)."""
        if not self.fast.s.trim_prefix:
            return self.fast.cfg.max_token_len
        return next(b for b in self.buckets if b >= length)

    def kept_slots(self, image_masks: Sequence[bool]) -> tuple[int, ...]:
        """Image slots the programs take: the used ones with `trim_prefix`, all of them without."""
        return tuple(i for i, m in enumerate(image_masks) if m or not self.fast.s.trim_prefix)

    def route(
        self, images, image_masks, tokens, token_mask, num_steps: int | None
    ) -> tuple[int, tuple[int, ...], tuple[torch.Tensor, ...]]:
        """Check a call and pick its bucket and image slots -> (bucket, kept slots, trimmed inputs)."""
        if num_steps not in (None, self.fast.num_steps):
            raise ValueError(f"engine built for {self.fast.num_steps} steps, called with {num_steps}")
        if images.shape[0] != self.batch_size:
            raise ValueError(f"engine built for batch {self.batch_size}, called with {images.shape[0]}")
        host_masks = image_masks.cpu()
        bucket = self.bucket_for(int(token_mask.cpu().sum(dim=1).max()))
        trimmed = self.fast.select_inputs(images, host_masks, tokens, token_mask, bucket)
        return bucket, self.kept_slots(host_masks.any(dim=0).tolist()), trimmed
