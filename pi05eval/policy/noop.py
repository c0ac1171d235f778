"""`policy=noop`: holds the arm still with the gripper open. A floor: it must never be counted as a success."""

from __future__ import annotations

import numpy as np

from pi05eval.env.protocol import DUMMY_ACTION
from pi05eval.policy.base import ActionChunk, Observation, TaskInfo


class NoopPolicy:
    needs_privileged = False
    uses_cuda = False

    def __init__(self, name: str = "noop", action_horizon: int = 10) -> None:
        self.name = name
        self.action_horizon = action_horizon
        self.chunk = np.tile(np.asarray(DUMMY_ACTION), (action_horizon, 1))  # [H, 7]

    def check_task(self, task: TaskInfo) -> None:
        pass

    def warmup(self) -> float:
        return 0.0

    def reset(self) -> None:
        pass

    def infer(self, obs: Observation) -> ActionChunk:
        return ActionChunk(actions=self.chunk.copy())
