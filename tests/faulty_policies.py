"""Policies that misbehave on purpose, to check that the runner records their failures as episode errors."""

from __future__ import annotations

import numpy as np

from pi05eval.env.protocol import DUMMY_ACTION
from pi05eval.policy.base import ActionChunk, Observation, TaskInfo


class FaultyPolicy:
    """Episode 1: NaN actions; episode 2: a [10, 6] chunk; episode 3: raises; episode 4: 3 actions, fewer than the
    runner replans after; later episodes: hold still."""

    needs_privileged = False
    uses_cuda = False

    def __init__(self, name: str = "faulty") -> None:
        self.name = name
        self.episode = 0

    def check_task(self, task: TaskInfo) -> None:
        pass

    def warmup(self) -> float:
        return 0.0

    def reset(self) -> None:
        self.episode += 1

    def infer(self, obs: Observation) -> ActionChunk:
        if self.episode == 1:
            return ActionChunk(np.full((10, 7), np.nan))
        if self.episode == 2:
            return ActionChunk(np.zeros((10, 6)))
        if self.episode == 3:
            raise RuntimeError("policy exploded")
        if self.episode == 4:
            return ActionChunk(np.tile(DUMMY_ACTION, (3, 1)))
        return ActionChunk(np.tile(DUMMY_ACTION, (10, 1)))
