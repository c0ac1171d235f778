"""Calibration observations: real LIBERO frames of the run's suite, recorded once and cached on disk.

Observation i comes from task i mod T of the suite's selected tasks, in LIBERO initial state 49 − ⌊i / T⌋ (counting
down from the last state, so the frames are not the first trials an evaluation runs), after `num_steps_wait` no-op
steps (openpi's protocol lets objects settle that long before the first call). The first `num_obs` feed
calibration, the following `holdout` are kept out of it for the fidelity ledger.

The cache file is keyed by suite, tasks and counts and records which suite it came from; a file recorded for another
suite is refused with a message rather than used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pi05eval.errors import run_command
from pi05eval.policy.base import Observation
from pi05eval.policy.bundle import cache_root
from pi05eval.precision.plan import CalibrationConfig, PrecisionError

log = logging.getLogger(__name__)

NOOP = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # OSC delta zero, gripper open: openpi's wait action
LAST_INIT_STATE = 49


@dataclass(frozen=True)
class CalibrationSet:
    """Recorded observations and where they came from."""

    observations: list[Observation]
    meta: dict[str, Any]

    def split(self, num_obs: int) -> tuple[list[Observation], list[Observation]]:
        """(calibration, held-out): the first `num_obs`, then the rest."""
        return self.observations[:num_obs], self.observations[num_obs:]


def default_dir() -> Path:
    return cache_root() / "calibration"


def _suite_fields(suite: Any) -> dict[str, Any]:
    """name / suites / tasks of a suite config (a mapping or a `SuiteConfig`)."""
    get = suite.get if hasattr(suite, "get") else lambda k, d=None: getattr(suite, k, d)
    tasks = get("tasks", None)
    return {
        "name": str(get("name")),
        "suites": [str(s) for s in get("suites", [])],
        "tasks": None if tasks is None else [int(t) for t in tasks],
    }


def cache_path(cfg: CalibrationConfig) -> Path:
    if cfg.path:
        return Path(cfg.path)
    if cfg.suite is None:
        raise PrecisionError("calibration needs the run's suite (precision.calibration.suite) or a recorded file path")
    fields = _suite_fields(cfg.suite)
    key = json.dumps([fields, cfg.num_obs + cfg.holdout, cfg.num_steps_wait, cfg.source], sort_keys=True)
    return default_dir() / f"{fields['name']}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.npz"


def save(path: Path, observations: list[Observation], meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(
        tmp,
        image=np.stack([o.image for o in observations]),  # [N, 224, 224, 3] uint8
        wrist_image=np.stack([o.wrist_image for o in observations]),
        state=np.stack([o.state for o in observations]),  # [N, 8]
        prompt=np.array([o.prompt for o in observations]),
        meta=np.array(json.dumps(meta)),
    )
    os.replace(tmp, path)


def load(path: Path) -> CalibrationSet:
    with np.load(path, allow_pickle=False) as f:
        meta = json.loads(str(f["meta"]))
        obs = [
            Observation(image=i, wrist_image=w, state=s, prompt=str(p))
            for i, w, s, p in zip(f["image"], f["wrist_image"], f["state"], f["prompt"], strict=True)
        ]
    return CalibrationSet(obs, meta)


def calibration_set(cfg: CalibrationConfig) -> CalibrationSet:
    """Load the cached observations of `cfg.suite`, recording them first where there are none."""
    path = cache_path(cfg)
    need = cfg.num_obs + cfg.holdout
    if path.exists():
        data = load(path)
        if cfg.suite is not None and data.meta.get("suite") != _suite_fields(cfg.suite)["name"]:
            raise PrecisionError(
                f"calibration file {path} was recorded on suite {data.meta.get('suite')!r}, this run evaluates "
                f"{_suite_fields(cfg.suite)['name']!r}: set policy.precision.calibration.path=null to record the "
                "run's own suite, or point it at a file of that suite"
            )
        if len(data.observations) < need:
            if cfg.path:
                raise PrecisionError(
                    f"calibration file {path} holds {len(data.observations)} observations; num_obs + holdout = {need}"
                )
            log.info("calibration cache %s too small; recording again", path)
        else:
            log.info("calibration observations from %s (%d)", path, len(data.observations))
            return CalibrationSet(data.observations[:need], data.meta)
    elif cfg.path:
        raise PrecisionError(f"calibration file {path} does not exist (set calibration.path=null to record one)")
    observations, meta = record(cfg.suite, need, cfg.num_steps_wait)
    save(path, observations, meta)
    log.info("recorded %d calibration observations into %s", len(observations), path)
    return CalibrationSet(observations, meta)


def record(suite: Any, count: int, num_steps_wait: int) -> tuple[list[Observation], dict[str, Any]]:
    """Step LIBERO into `count` initial states of the suite and keep the policy's observation of each."""
    from pi05eval.env.libero_env import TaskEnv, configure_rendering, load_triton_before_gl
    from pi05eval.env.observation import make_observation
    from pi05eval.env.suite import SuiteConfig, load_tasks

    configure_rendering(None)  # before LIBERO imports mujoco
    load_triton_before_gl()  # a policy being calibrated runs in this process
    fields = _suite_fields(suite)
    tasks = load_tasks(
        SuiteConfig(
            name=fields["name"],
            suites=tuple(fields["suites"]),
            tasks=None if fields["tasks"] is None else tuple(fields["tasks"]),
        )
    )
    plan: dict[int, list[int]] = {}
    for i in range(count):
        plan.setdefault(i % len(tasks), []).append(LAST_INIT_STATE - i // len(tasks))
    by_index: dict[tuple[int, int], Observation] = {}
    start = time.perf_counter()
    for t, states in plan.items():
        env = TaskEnv(tasks[t], lazy_render=True)
        try:
            env.env.reset()
            env._install_gates()
            for k in states:
                raw = env.env.set_init_state(env.init_states[k])
                for s in range(num_steps_wait):
                    raw, _, _, _ = env.step(NOOP, render=s == num_steps_wait - 1)
                by_index[(t, k)] = make_observation(raw, tasks[t].language)
        finally:
            env.close()
    observations = [by_index[(i % len(tasks), LAST_INIT_STATE - i // len(tasks))] for i in range(count)]
    meta = {
        "suite": fields["name"],
        "suites": fields["suites"],
        "tasks": [f"{t.suite}/{t.task_id}" for t in tasks],
        "init_states": {f"{tasks[t].suite}/{tasks[t].task_id}": s for t, s in plan.items()},
        "num_steps_wait": num_steps_wait,
        "record_s": round(time.perf_counter() - start, 1),
    }
    return observations, meta


def main(argv: list[str] | None = None) -> None:
    """Record calibration frames into a file (e.g. for `python -m pi05eval.bench --calib FILE` on a GPU machine
    that has no LIBERO): `python -m pi05eval.precision.calibration --suite libero_spatial --count 40 --out F.npz`."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--suite", default="libero_spatial", help="a LIBERO suite name")
    p.add_argument("--tasks", type=int, nargs="*", help="task ids (default: all)")
    p.add_argument("--count", type=int, default=40, help="observations to record")
    p.add_argument("--num-steps-wait", type=int, default=10)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    suite = {"name": args.suite, "suites": [args.suite], "tasks": args.tasks}
    observations, meta = record(suite, args.count, args.num_steps_wait)
    save(Path(args.out), observations, meta)
    log.info("wrote %d observations of %s to %s", len(observations), args.suite, args.out)


if __name__ == "__main__":
    run_command(main)
