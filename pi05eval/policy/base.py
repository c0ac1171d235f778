"""The policy interface the runner talks to: `reset()` and `infer(obs) -> ActionChunk`.

Policies run in the main process; environments run in worker processes and send `Observation`s.
A policy that needs privileged simulator state (ground-truth object poses, the task's goal predicates)
sets `needs_privileged = True` and then finds it in `Observation.privileged`; other policies never see it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from pi05eval.errors import SetupError

ACTION_DIM = 7  # OSC_POSE delta (xyz, axis-angle) + gripper (-1 open, +1 close)


@dataclass(frozen=True)
class Observation:
    """What openpi's LIBERO client sends to its policy server, plus optional privileged state."""

    image: np.ndarray  # [224, 224, 3] uint8, agentview camera rotated 180°
    wrist_image: np.ndarray  # [224, 224, 3] uint8, eye-in-hand camera rotated 180°
    state: np.ndarray  # [8] float64: eef pos (3), eef axis-angle (3), gripper qpos (2)
    prompt: str  # task language instruction
    privileged: Mapping[str, Any] | None = None  # raw simulator obs + task goal; only for policies that ask


@dataclass(frozen=True)
class ActionChunk:
    """One policy call's output."""

    actions: np.ndarray  # [H, 7] float, executed open-loop for runner.replan_steps steps
    stage_ms: Mapping[str, float] = field(default_factory=dict)  # e.g. vision / prefill / denoise (CUDA events)
    info: Mapping[str, Any] = field(default_factory=dict)  # kept in the episode record, e.g. prompt_truncated


@dataclass(frozen=True)
class TaskInfo:
    """What a policy may inspect before any simulation to accept or refuse a task."""

    suite: str
    task_id: int
    language: str
    goal: tuple[tuple[str, ...], ...]  # BDDL goal predicates, e.g. (("on", "akita_black_bowl_1", "plate_1"),)


class UnsupportedTaskError(SetupError, ValueError):
    """Raised by `Policy.check_task` for a task the policy cannot attempt."""


@runtime_checkable
class Policy(Protocol):
    name: str
    needs_privileged: bool  # receive `Observation.privileged`
    uses_cuda: bool  # the runner synchronizes CUDA around each timed call
    # A policy may also set `stateful = True` when it keeps per-episode state between calls: the runner then gives
    # each concurrent env its own copy. Otherwise one instance serves interleaved calls from all envs.

    def check_task(self, task: TaskInfo) -> None:
        """Raise UnsupportedTaskError (with a clear message) for a task this policy cannot attempt."""
        ...

    def warmup(self) -> float:
        """Build/compile/warm up; return the seconds spent (reported apart from call latency)."""
        ...

    def reset(self) -> None:
        """Called at the start of every episode."""
        ...

    def infer(self, obs: Observation) -> ActionChunk: ...
