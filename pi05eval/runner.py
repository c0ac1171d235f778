"""The episode loop: env workers step LIBERO, the main process serves their policy calls and times each one.

Latency (DESIGN.md invariant 2): host observation in → host actions out, with CUDA synchronized when the policy
uses it; per-stage times come from the policy. Every episode becomes one record appended to `episodes.jsonl` when
it ends; an exception in the env or the policy, a dead worker or an invalid action chunk is recorded as `error`.
"""

from __future__ import annotations

import copy
import logging
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from multiprocessing.connection import wait
from typing import Any

import numpy as np

from pi05eval.env.protocol import NUM_STEPS_WAIT, REPLAN_STEPS, SEED
from pi05eval.env.suite import EpisodeSpec
from pi05eval.env.worker import FaultSpec, WorkerHandle, WorkerOptions
from pi05eval.errors import Terminated
from pi05eval.metrics import latency_summary
from pi05eval.policy.base import ACTION_DIM, ActionChunk, Observation, Policy
from pi05eval.scheduler import TaskScheduler

log = logging.getLogger(__name__)

VIDEO_MODES = ("none", "failures", "all")


@dataclass(frozen=True)
class RunnerConfig:
    """`conf/runner/*.yaml`; defaults are openpi's protocol."""

    num_envs: int = 1  # env worker processes running episodes concurrently
    replan_steps: int = REPLAN_STEPS  # actions of each chunk executed before the next query
    num_steps_wait: int = NUM_STEPS_WAIT  # settle steps with the dummy action
    max_steps: int | None = None  # None: the suite's openpi limit; an int overrides it (a protocol deviation)
    lazy_render: bool = True  # render only the steps whose images the policy reads
    video: str = "none"  # none | failures | all
    video_fps: int = 10
    mujoco_gl: str | None = None  # None: egl with a GPU, else osmesa (MUJOCO_GL in the environment wins)
    retry_errors: bool = False  # on resume, run episodes recorded as errors again
    progress: bool = True
    fault: FaultSpec | None = None  # testing only: inject a crash into one episode

    def __post_init__(self) -> None:
        if self.num_envs < 1:
            raise ValueError(f"runner.num_envs must be >= 1, got {self.num_envs}")
        if self.replan_steps < 1:
            raise ValueError(f"runner.replan_steps must be >= 1, got {self.replan_steps}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"runner.max_steps must be >= 1 or null, got {self.max_steps}")
        if self.num_steps_wait < 0:
            raise ValueError(f"runner.num_steps_wait must be >= 0, got {self.num_steps_wait}")
        if self.video not in VIDEO_MODES:
            raise ValueError(f"runner.video must be one of {list(VIDEO_MODES)}, got {self.video!r}")
        if self.mujoco_gl not in (None, "egl", "osmesa", "glfw"):
            raise ValueError(f"runner.mujoco_gl must be egl, osmesa or glfw (or null), got {self.mujoco_gl!r}")


class InvalidActionsError(ValueError):
    """A policy returned actions the env cannot execute."""


def check_actions(chunk: ActionChunk) -> np.ndarray:
    actions = np.asarray(chunk.actions)
    if actions.ndim != 2 or actions.shape[1] != ACTION_DIM or actions.shape[0] < 1:
        raise InvalidActionsError(f"policy returned actions of shape {actions.shape}, expected [H, {ACTION_DIM}]")
    if not np.all(np.isfinite(actions)):
        raise InvalidActionsError(f"policy returned non-finite actions: {actions.tolist()}")
    return actions.astype(np.float64)


class _Episode:
    """Book-keeping of one episode in flight."""

    def __init__(self, spec: EpisodeSpec, worker: int, policy: Policy) -> None:
        self.spec = spec
        self.worker = worker
        self.policy = policy
        self.started = time.perf_counter()
        self.latency_ms: list[float] = []
        self.stage_ms: dict[str, list[float]] = {}
        self.info: dict[str, Any] = {}

    def record(self, status: str, result: dict[str, Any] | None = None, error: str | None = None) -> dict[str, Any]:
        result = result or {}
        task = self.spec.task
        return {
            "suite": task.suite,
            "task_id": task.task_id,
            "task": task.name,
            "language": task.language,
            "trial": self.spec.trial,
            "init_state": self.spec.trial,
            "seed": SEED,
            "status": status,
            "success": status == "success",
            "steps": result.get("steps", 0),
            "calls": len(self.latency_ms),
            "wall_s": time.perf_counter() - self.started,
            "sim_s": result.get("sim_s", 0.0),
            "latency": latency_summary(self.latency_ms),
            "latency_ms": [round(x, 4) for x in self.latency_ms],
            "stage_ms": {k: [round(x, 4) for x in v] for k, v in self.stage_ms.items()},
            "error": error,
            "video": result.get("video"),
            "worker": self.worker,
            "policy_info": self.info,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }


def timed_infer(policy: Policy, obs: Observation) -> tuple[ActionChunk, float]:
    """Call the policy; wall milliseconds from host observation to host actions, CUDA synchronized."""
    t0 = time.perf_counter()
    chunk = policy.infer(obs)
    if policy.uses_cuda:
        import torch

        torch.cuda.synchronize()
    return chunk, (time.perf_counter() - t0) * 1e3


def run(
    policy: Policy,
    episodes: Sequence[EpisodeSpec],
    cfg: RunnerConfig,
    on_record: Callable[[dict[str, Any]], None],
    video_dir: str | None = None,
    mujoco_gl: str = "osmesa",
) -> None:
    """Run `episodes`; `on_record` receives each finished episode's record (it persists it)."""
    if not episodes:
        return
    opts = WorkerOptions(
        replan_steps=cfg.replan_steps,
        num_steps_wait=cfg.num_steps_wait,
        max_steps=cfg.max_steps,
        lazy_render=cfg.lazy_render,
        privileged=policy.needs_privileged,
        mujoco_gl=mujoco_gl,
        video=cfg.video,
        video_dir=video_dir,
        video_fps=cfg.video_fps,
        fault=cfg.fault,
        log_level=logging.getLogger().getEffectiveLevel(),
    )
    scheduler = TaskScheduler(episodes)
    n_workers = min(cfg.num_envs, len(episodes))
    stateful = getattr(policy, "stateful", False)
    policies = [copy.deepcopy(policy) if stateful and n_workers > 1 else policy for _ in range(n_workers)]
    workers = [WorkerHandle(i, opts) for i in range(n_workers)]
    flight: dict[int, _Episode] = {}

    def assign(w: WorkerHandle) -> None:
        spec = scheduler.next_for(w.worker_id)
        if spec is None:
            return
        pol = policies[w.worker_id]
        pol.reset()
        flight[w.worker_id] = _Episode(spec, w.worker_id, pol)
        try:
            w.send("episode", spec)
        except (BrokenPipeError, OSError):  # it died after its last episode: start a fresh one
            log.warning("%s; restarting it", w.describe_death())
            w.restart()
            w.send("episode", spec)

    def finish(w: WorkerHandle, record: dict[str, Any]) -> None:
        del flight[w.worker_id]
        on_record(record)
        assign(w)

    try:
        for w in workers:
            assign(w)
        while flight:
            busy = [workers[i] for i in flight]
            ready = wait([w.conn for w in busy] + [w.proc.sentinel for w in busy])
            for w in busy:
                if w.worker_id not in flight or not (w.conn in ready or w.proc.sentinel in ready):
                    continue
                _serve(w, flight[w.worker_id], finish)
    except BaseException:  # Ctrl-C or a bug: the episodes in flight are dropped (a rerun runs them), not waited for
        for w in workers:
            w.stop()
        raise
    for w in workers:
        w.close()


def _serve(w: WorkerHandle, ep: _Episode, finish: Callable[[WorkerHandle, dict[str, Any]], None]) -> None:
    """Handle one message from worker `w` (or its death)."""
    try:
        if not w.conn.poll():
            raise EOFError
        msg = w.conn.recv()
    except (EOFError, OSError):
        reason = w.describe_death()
        if w.terminated:  # SIGTERM from outside: the job is being shut down; a rerun runs the episode
            log.warning("env worker %d was terminated (SIGTERM from outside the run): stopping", w.worker_id)
            raise Terminated from None
        log.error("%s during %s trial %d; restarting it", reason, ep.spec.task.name, ep.spec.trial)
        w.restart()
        finish(w, ep.record("error", error=reason))
        return
    kind = msg[0]
    if kind == "obs":
        try:
            chunk, ms = timed_infer(ep.policy, msg[1])
            actions = check_actions(chunk)
        except Exception:
            tb = traceback.format_exc()
            log.error("policy failed in %s trial %d:\n%s", ep.spec.task.name, ep.spec.trial, tb)
            ep.info["abort"] = tb
            w.send("abort", tb.splitlines()[-1])
            return
        ep.latency_ms.append(ms)
        for name, value in chunk.stage_ms.items():
            ep.stage_ms.setdefault(name, []).append(float(value))
        if chunk.info:
            ep.info.update(chunk.info)
        w.send("actions", actions)
    elif kind == "done":
        finish(w, ep.record("success" if msg[1]["success"] else "failure", result=msg[1]))
    elif kind == "failed":
        log.error("env failed in %s trial %d:\n%s", ep.spec.task.name, ep.spec.trial, msg[1])
        finish(w, ep.record("error", error=msg[1]))
    elif kind == "aborted":
        finish(w, ep.record("error", error=ep.info.pop("abort", "aborted")))
    else:
        raise RuntimeError(f"unexpected message from env worker {w.worker_id}: {kind!r}")
