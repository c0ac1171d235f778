"""`engine=eager`: `Pi05Model` run op by op, as openpi's PyTorch path does, with CUDA-event stage times."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from pi05eval.model.pi05 import Pi05Model, euler_schedule


class EagerEngine:
    name = "eager"

    def __init__(self, model: Pi05Model, num_steps: int) -> None:
        self.model = model
        self.num_steps = num_steps
        self.device = model.action_in.weight.device
        self.cuda = self.device.type == "cuda"
        self.events = [torch.cuda.Event(enable_timing=True) for _ in range(4)] if self.cuda else []
        self.build_s: dict[str, float] = {}

    def prepare(self, prompt_lengths: Iterable[int], image_masks: tuple[bool, ...] = (True, True, False)) -> float:
        return 0.0

    def _mark(self, i: int) -> None:
        if self.cuda:
            self.events[i].record()

    @torch.no_grad()
    def sample_actions(self, images, image_masks, tokens, token_mask, noise, num_steps: int | None = None):
        """`Pi05Model.sample_actions` split into stages: vision (+ prompt embedding), prefill, denoise."""
        m, dev = self.model, self.device
        images, image_masks, tokens, token_mask, noise = (
            x.to(dev, non_blocking=True) for x in (images, image_masks, tokens, token_mask, noise)
        )
        self._mark(0)
        prefix = m.embed_prefix(images, image_masks, tokens, token_mask)
        self._mark(1)
        cache = m.prefill(*prefix)
        self._mark(2)
        times, dt = euler_schedule(num_steps or self.num_steps)
        x = noise.float()
        for t in times:
            x = x + dt * m.denoise_step(x, torch.full((x.shape[0],), t, dtype=torch.float32, device=dev), cache)
        self._mark(3)
        return x

    def stage_ms(self) -> dict[str, float]:
        if not self.cuda:
            return {}
        ev = self.events
        return {name: ev[i].elapsed_time(ev[i + 1]) for i, name in enumerate(("vision", "prefill", "denoise"))}
