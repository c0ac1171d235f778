"""One LIBERO task environment run exactly like openpi's client, with lazy rendering.

RNG stream (DESIGN.md invariant 1): openpi seeds a task's env once and runs its trials in order; every hard
`reset()` draws fixture placements from numpy's global RNG, so trial k sees the RNG left by the k resets before
it. `TaskEnv.start_trial(k)` reproduces that from any starting point: it re-seeds when it has gone past k and
performs the missing resets ("fast-forward") otherwise.

Lazy rendering: robosuite samples camera observables at a fixed rate inside `step()`. We keep that bookkeeping
untouched and only swap each camera's sensor for one that renders when the step's image will be read (the last wait
step and the step that empties the action plan) and returns a blank frame otherwise, so the images the policy sees
are the very frames full rendering would produce.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pi05eval.env.protocol import CAMERA_SIZE, DUMMY_ACTION, SEED
from pi05eval.env.suite import EpisodeSpec, TaskSpec, load_init_states

log = logging.getLogger(__name__)

CAMERA_OBSERVABLES = ("agentview_image", "robot0_eye_in_hand_image")


def default_gl_backend() -> str:
    """`egl` where an NVIDIA GPU is visible, else `osmesa` (software)."""
    has_gpu = os.path.exists("/dev/nvidia0") or bool(os.environ.get("CUDA_VISIBLE_DEVICES", "").strip("-1, "))
    return "egl" if has_gpu else "osmesa"


def configure_rendering(backend: str | None = None) -> str:
    """Set MUJOCO_GL (and PyOpenGL's platform) before mujoco is imported; an explicit MUJOCO_GL wins."""
    gl = backend or os.environ.get("MUJOCO_GL") or default_gl_backend()
    os.environ["MUJOCO_GL"] = gl
    if gl in ("osmesa", "egl"):
        os.environ.setdefault("PYOPENGL_PLATFORM", gl)
    return gl


def load_triton_before_gl() -> None:
    """Import Triton now, if it is installed, before mujoco opens a GL library: for processes that both simulate and
    run a policy (the env workers, which only simulate, skip it: ~80 MB and 0.2 s each).

    Mesa's OSMesa / EGL libraries bring their own LLVM, which PyOpenGL loads into the global symbol scope; Triton's
    compiler library imported after them crashes the process (a segfault inside `import triton`, measured with mujoco
    3.2.3 + Mesa 22.3 + Triton 3.9 under `MUJOCO_GL=osmesa` and `egl`). A Pi0.5 policy imports Triton later in the
    same process (torch.compile, the Triton kernels, even `torch.nn.init` under a device context), so it is loaded
    first here (~0.2 s); in that order both work. Where mujoco is already imported it is too late (importing Triton
    then is what crashes): nothing is done, and the caller must not need Triton.
    """
    import importlib.util
    import sys

    if "mujoco" in sys.modules or "OpenGL" in sys.modules:
        log.debug("mujoco is already imported: Triton is not preloaded")
        return
    if importlib.util.find_spec("triton") is not None:
        import triton  # noqa: F401


class _RenderGate:
    """A camera sensor that renders only while `open` is set."""

    def __init__(self, sensor: Callable, blank: np.ndarray) -> None:
        self.sensor = sensor
        self.blank = blank
        self.open = False
        self.renders = 0
        self.__modality__ = sensor.__modality__  # robosuite validates sensors by this attribute

    def __call__(self, obs_cache):
        if self.open:
            self.renders += 1
            return self.sensor(obs_cache)
        return self.blank


@dataclass(frozen=True)
class StepRecord:
    """What the episode loop reports back (see `run_episode`)."""

    success: bool
    steps: int  # env steps taken, wait steps included (openpi's `t`)
    calls: int  # policy queries
    sim_seconds: float  # wall time spent inside env.step


class TaskEnv:
    """A LIBERO env for one task that reproduces openpi's per-task RNG stream and renders lazily."""

    def __init__(self, task: TaskSpec, lazy_render: bool = True) -> None:
        from libero.libero.envs import OffScreenRenderEnv

        self.task = task
        self.lazy_render = lazy_render
        t0 = time.perf_counter()
        self.env = OffScreenRenderEnv(
            bddl_file_name=task.bddl_file, camera_heights=CAMERA_SIZE, camera_widths=CAMERA_SIZE
        )
        self.init_states = load_init_states(task)  # [50, state_dim]
        self.env.seed(SEED)
        self.resets_done = 0  # hard resets since the last seed
        self.gates: list[_RenderGate] = []
        log.debug("env for %s/%d built in %.1fs", task.suite, task.task_id, time.perf_counter() - t0)

    def close(self) -> None:
        self.env.close()

    def start_trial(self, trial: int) -> dict:
        """Reset into init state `trial` with the RNG stream openpi's in-order loop would have; returns raw obs."""
        if self.resets_done > trial:
            self.env.seed(SEED)
            self.resets_done = 0
        if trial - self.resets_done > 0:
            log.info(
                "fast-forwarding %s/%d by %d resets to reach trial %d",
                self.task.suite,
                self.task.task_id,
                trial - self.resets_done,
                trial,
            )
        while self.resets_done < trial:
            self.env.reset()
            self.resets_done += 1
        self.env.reset()
        self.resets_done += 1
        self._install_gates()
        return self.env.set_init_state(self.init_states[trial])

    def _install_gates(self) -> None:
        """Hard resets rebuild the observables' sensors: wrap the camera ones again."""
        self.gates = []
        if not self.lazy_render:
            return
        observables = self.env.env._observables
        for name in CAMERA_OBSERVABLES:
            obs = observables[name]
            gate = _RenderGate(obs._sensor, np.zeros((CAMERA_SIZE, CAMERA_SIZE, 3), np.uint8))
            obs.set_sensor(gate)
            self.gates.append(gate)

    def step(self, action, render: bool):
        for gate in self.gates:
            gate.open = render
        return self.env.step(np.asarray(action, dtype=np.float64).tolist())


def run_episode(
    env: TaskEnv,
    spec: EpisodeSpec,
    query: Callable[[dict, int], np.ndarray],
    replan_steps: int,
    num_steps_wait: int,
    max_steps: int | None = None,
) -> StepRecord:
    """openpi's episode loop. `query(raw_obs, t)` returns the actions to run open-loop (already cut to replan).

    Success iff the env reports done before `max_steps` policy steps; done during the wait steps is ignored,
    as in openpi.
    """
    raw = env.start_trial(spec.trial)
    t, calls, sim_s = 0, 0, 0.0
    plan: list[np.ndarray] = []
    limit = (max_steps or spec.task.max_steps) + num_steps_wait
    while t < limit:
        if t < num_steps_wait:
            t0 = time.perf_counter()
            raw, _, _, _ = env.step(DUMMY_ACTION, render=t == num_steps_wait - 1)
            sim_s += time.perf_counter() - t0
            t += 1
            continue
        if not plan:
            chunk = query(raw, t)
            if len(chunk) < replan_steps:  # never run a shorter plan than asked for in silence
                raise ValueError(f"the policy returned {len(chunk)} actions, fewer than replan_steps={replan_steps}")
            plan = list(chunk[:replan_steps])
            calls += 1
        action = plan.pop(0)
        t0 = time.perf_counter()
        raw, _, done, _ = env.step(action, render=not plan)
        sim_s += time.perf_counter() - t0
        if done:
            return StepRecord(success=True, steps=t + 1, calls=calls, sim_seconds=sim_s)
        t += 1
    return StepRecord(success=False, steps=t, calls=calls, sim_seconds=sim_s)
