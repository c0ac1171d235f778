"""Env worker processes: each runs LIBERO episodes and asks the main process for actions over a pipe.

Main → worker: ("episode", EpisodeSpec) · ("actions", [K, 7]) · ("abort", reason) · ("close",)
Worker → main: ("obs", Observation) · ("done", dict) · ("failed", traceback) · ("aborted",)

A worker that dies (segfault, OOM kill) closes its pipe; the main process sees it and records the episode in
flight as an error. Workers exit when the main process dies (parent-death signal, and EOF on the pipe). Ctrl-C is
the main process's to handle (workers ignore SIGINT): it stops the workers with SIGTERM, on which a worker drops its
episode in flight, finishes the video it may still be encoding for an episode already recorded, and exits with status
`TERMINATED`. A worker terminated so from outside (a scheduler's preemption) stops the run the same way: its episode
is not an error of the policy or the simulator.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing as mp
import os
import signal
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from pi05eval.results import unique_video_path

log = logging.getLogger(__name__)

TERMINATED = 128 + signal.SIGTERM  # a worker's exit status after SIGTERM: the run is being shut down, not a crash


@dataclass(frozen=True)
class FaultSpec:
    """Deliberate failure for testing the runner's crash handling (`runner.fault`)."""

    task_id: int
    trial: int
    kind: str = "segfault"  # segfault | raise | exit
    at_call: int = 1  # before the n-th policy query of that episode

    def __post_init__(self) -> None:
        if self.kind not in ("segfault", "raise", "exit"):
            raise ValueError(f"runner.fault.kind must be segfault, raise or exit, got {self.kind!r}")


@dataclass(frozen=True)
class WorkerOptions:
    replan_steps: int
    num_steps_wait: int
    max_steps: int | None  # None: the task's own limit
    lazy_render: bool
    privileged: bool  # send raw simulator state with each observation
    mujoco_gl: str
    video: str = "none"  # none | failures | all
    video_dir: str | None = None
    video_fps: int = 10
    fault: FaultSpec | None = None
    log_level: int = logging.WARNING
    extra_env: dict[str, str] = field(default_factory=dict)


class EpisodeAborted(Exception):
    """The main process abandoned the episode (the policy failed)."""


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: EOF on the pipe still ends the worker
        pass


def _inject(fault: FaultSpec) -> None:
    log.warning("injecting fault %s", fault)
    if fault.kind == "segfault":
        ctypes.string_at(0)
    elif fault.kind == "exit":
        os._exit(3)
    raise RuntimeError(f"injected fault in task {fault.task_id} trial {fault.trial}")


def _write_video(path: Path, frames: list[np.ndarray], fps: int) -> None:
    """Encode to `<name>.part.mp4`, then rename: a write cut short never leaves a truncated file under `path`."""
    import imageio.v2 as imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f"{path.stem}.part{path.suffix}")
    imageio.mimwrite(part, frames, fps=fps, macro_block_size=1)
    os.replace(part, path)


def worker_main(conn: Connection, worker_id: int, opts: WorkerOptions) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the main process handles it
    os.environ.update(opts.extra_env)
    from pi05eval.env.libero_env import TaskEnv, configure_rendering, run_episode
    from pi05eval.env.observation import make_observation

    logging.basicConfig(level=opts.log_level, format=f"[env{worker_id}] %(levelname)s %(name)s: %(message)s")
    configure_rendering(opts.mujoco_gl)
    videos = ThreadPoolExecutor(max_workers=1)
    pending_video: Future | None = None

    def stop(signum: int, frame: Any) -> None:  # `WorkerHandle.stop`: the episode in flight is dropped, not the video
        videos.shutdown(wait=True)  # of the last recorded one, which may still be encoding
        os._exit(TERMINATED)

    signal.signal(signal.SIGTERM, stop)
    env: TaskEnv | None = None
    try:
        while True:
            try:
                msg = conn.recv()
            except EOFError:
                return
            if msg[0] == "close":
                return
            _, spec = msg
            frames: list[np.ndarray] = []
            record_video = opts.video != "none" and opts.video_dir is not None

            def query(raw: dict, t: int, spec=spec, frames=frames, record_video=record_video) -> np.ndarray:
                fault = opts.fault
                n_call = getattr(query, "calls", 0) + 1
                query.calls = n_call  # type: ignore[attr-defined]
                if fault and (fault.task_id, fault.trial, fault.at_call) == (spec.task.task_id, spec.trial, n_call):
                    _inject(fault)
                obs = make_observation(raw, spec.task.language, spec.task.goal, privileged=opts.privileged)
                if record_video:
                    frames.append(np.concatenate([obs.image, obs.wrist_image], axis=1))
                conn.send(("obs", obs))
                reply = conn.recv()
                if reply[0] == "abort":
                    raise EpisodeAborted(reply[1])
                return reply[1]

            t0 = time.perf_counter()
            try:
                if env is None or env.task != spec.task:
                    if env is not None:
                        env.close()
                    env = None
                    env = TaskEnv(spec.task, lazy_render=opts.lazy_render)
                rec = run_episode(env, spec, query, opts.replan_steps, opts.num_steps_wait, opts.max_steps)
            except EpisodeAborted:
                conn.send(("aborted",))
                continue
            except Exception:
                conn.send(("failed", traceback.format_exc()))
                env = None  # state unknown: rebuild for the next episode
                continue
            result: dict[str, Any] = {
                "success": rec.success,
                "steps": rec.steps,
                "calls": rec.calls,
                "sim_s": rec.sim_seconds,
                "env_wall_s": time.perf_counter() - t0,
                "video": None,
            }
            if record_video and frames and (opts.video == "all" or not rec.success):
                outcome = "success" if rec.success else "failure"
                final = unique_video_path(Path(opts.video_dir), spec.task.suite, spec.task.task_id, spec.trial, outcome)
                if pending_video is not None:
                    pending_video.result()
                pending_video = videos.submit(_write_video, final, frames, opts.video_fps)
                result["video"] = str(final)
            conn.send(("done", result))
    finally:
        videos.shutdown(wait=True)
        if env is not None:
            env.close()


class WorkerHandle:
    """Main-process side of one env worker."""

    def __init__(self, worker_id: int, opts: WorkerOptions) -> None:
        self.worker_id = worker_id
        self.opts = opts
        self.episode = None  # EpisodeSpec in flight
        self.started = 0.0
        self.start()

    def start(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=worker_main,
            args=(child, self.worker_id, self.opts),
            daemon=True,
            name=f"pi05eval-env{self.worker_id}",
        )
        self.proc.start()
        child.close()

    def restart(self) -> None:
        self.kill()
        self.start()

    def send(self, *msg: Any) -> None:
        self.conn.send(msg)

    def describe_death(self) -> str:
        self.proc.join(timeout=5)
        code = self.proc.exitcode
        if code is not None and code < 0:
            try:
                return f"env worker {self.worker_id} died from signal {signal.Signals(-code).name}"
            except ValueError:
                pass
        return f"env worker {self.worker_id} died (exit code {code})"

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=10)
        self.conn.close()

    @property
    def terminated(self) -> bool:
        """It ended on SIGTERM: from `stop`, or from outside (a scheduler preempting the job, `kill`)."""
        return self.proc.exitcode == TERMINATED

    def stop(self) -> None:
        """End the worker now, mid-episode or not, once it has written the video it may still be encoding."""
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout=30)
        self.kill()

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            self.conn.send(("close",))
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()
        self.conn.close()
