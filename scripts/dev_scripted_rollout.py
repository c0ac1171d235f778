"""Dev harness: roll out `ScriptedPolicy` on libero_spatial with openpi's episode protocol, without the runner.

One env per task, `env.seed(7)` once, trials 0..k-1 in order, 10 wait steps of `[0]*6 + [-1]`, at most 220 policy
steps, replanning every 5 of the chunk's actions, success iff `done`. Tasks are spread over worker processes
(each runs its tasks' trials in order, so the fixture RNG stream is openpi's). By default nothing is rendered
(`use_camera_obs=False`, zero images); `--render` gives the policy real 224×224 images and `--video DIR` writes
one agentview mp4 per episode.

    MUJOCO_GL=osmesa PYOPENGL_PLATFORM=osmesa python scripts/dev_scripted_rollout.py --tasks 0-9 --trials 5 --workers 2
    python scripts/dev_scripted_rollout.py --tasks 4 --trials 1 --trace --set pregrasp_width=0.035
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

SUITE = "libero_spatial"
MAX_STEPS = 220  # openpi's limit for libero_spatial
WAIT_STEPS = 10
REPLAN_STEPS = 5
SEED = 7
IMAGE_KEYS = ("agentview_image", "robot0_eye_in_hand_image")


def parse_ids(text: str) -> list[int]:
    """'0-3,7' -> [0, 1, 2, 3, 7]."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """['pos_gain=2.5', 'robot_base_xy=[-0.66,0]'] -> keyword arguments (values parsed as JSON when possible)."""
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def quat_to_axis_angle(quat: np.ndarray) -> np.ndarray:
    """openpi's `_quat2axisangle`: (x, y, z, w) -> axis * angle with the angle in [0, 2π)."""
    w = float(np.clip(quat[3], -1.0, 1.0))
    den = np.sqrt(1.0 - w * w)
    if np.isclose(den, 0.0):
        return np.zeros(3)
    return quat[:3] * 2.0 * np.arccos(w) / den


def to_observation(raw: dict[str, Any], goal: tuple[tuple[str, ...], ...], prompt: str, render: bool):
    from PIL import Image

    from pi05eval.policy.base import Observation

    def image(key: str) -> np.ndarray:
        if not render:
            return np.zeros((224, 224, 3), dtype=np.uint8)
        flipped = np.ascontiguousarray(raw[key][::-1, ::-1])  # [256, 256, 3], rotated 180°
        return np.asarray(Image.fromarray(flipped).resize((224, 224), Image.BILINEAR))

    state = np.concatenate(
        [raw["robot0_eef_pos"], quat_to_axis_angle(raw["robot0_eef_quat"]), raw["robot0_gripper_qpos"]]
    )  # [8]
    privileged = {k: np.asarray(v) for k, v in raw.items() if k not in IMAGE_KEYS}
    privileged["goal"] = goal
    return Observation(
        image=image(IMAGE_KEYS[0]), wrist_image=image(IMAGE_KEYS[1]), state=state, prompt=prompt, privileged=privileged
    )


def run_task(task_id: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """All trials of one task, in order, on one env (openpi's protocol)."""
    from libero.libero import benchmark, get_libero_path
    from libero.libero.envs import OffScreenRenderEnv

    from pi05eval.policy.base import TaskInfo
    from pi05eval.policy.scripted import ScriptedPolicy

    suite = benchmark.get_benchmark_dict()[SUITE]()
    task = suite.get_task(task_id)
    init_states = suite.get_task_init_states(task_id)  # [50, n_state]
    bddl = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
    render = args.render or args.video is not None
    env_kwargs: dict[str, Any] = {"camera_heights": 256, "camera_widths": 256}
    if not render:
        env_kwargs.update(use_camera_obs=False, has_offscreen_renderer=False)
    env = OffScreenRenderEnv(bddl_file_name=bddl, **env_kwargs)
    env.seed(SEED)
    goal = tuple(tuple(p) for p in env.env.parsed_problem["goal_state"])
    policy = ScriptedPolicy(**parse_overrides(args.set))
    policy.check_task(TaskInfo(suite=SUITE, task_id=task_id, language=str(task.language), goal=goal))
    records = []
    for trial in range(args.trials):
        env.reset()
        raw = env.set_init_state(init_states[trial])
        policy.reset()
        for _ in range(WAIT_STEPS):
            raw, _, _, _ = env.step([0.0] * 6 + [-1.0])
        t0, t, done, trace, frames, error = time.perf_counter(), 0, False, [], [], None
        try:
            while t < MAX_STEPS and not done:
                chunk = policy.infer(to_observation(raw, goal, str(task.language), render)).actions[:REPLAN_STEPS]
                trace.append((t, policy.phase.value))
                for action in chunk:
                    raw, _, done, _ = env.step(action.tolist())
                    t += 1
                    if args.video is not None:
                        frames.append(np.ascontiguousarray(raw[IMAGE_KEYS[0]][::-1, ::-1]))
                    if done or t >= MAX_STEPS:
                        break
        except Exception as exc:  # recorded apart from failures, never counted as one silently
            error = "".join(traceback.format_exception_only(exc)).strip()
        rec = {"task": task_id, "trial": trial, "success": bool(done), "steps": t, "phase": policy.phase.value}
        if error is not None:
            rec["error"] = error
        rec["wall_s"] = round(time.perf_counter() - t0, 2)
        if args.trace:
            rec["trace"] = _compress(trace)
        if frames:
            import imageio

            path = Path(args.video) / f"task{task_id:02d}_trial{trial:02d}_{'ok' if done else 'fail'}.mp4"
            path.parent.mkdir(parents=True, exist_ok=True)
            imageio.mimwrite(path, frames, fps=20)
        print(json.dumps(rec), flush=True)
        records.append(rec)
    env.close()
    return records


def _compress(trace: list[tuple[int, str]]) -> list[str]:
    """[(0, 'approach'), (5, 'approach'), (10, 'descend')] -> ['0:approach', '10:descend']."""
    return [f"{t}:{p}" for i, (t, p) in enumerate(trace) if i == 0 or trace[i - 1][1] != p]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="0-9", help="task ids, e.g. '0-9' or '4,6'")
    ap.add_argument("--trials", type=int, default=5, help="trials 0..N-1 per task, run in order")
    ap.add_argument("--workers", type=int, default=2, help="processes (tasks are spread over them)")
    ap.add_argument("--render", action="store_true", help="render the cameras and pass real images")
    ap.add_argument("--video", default=None, help="directory for one agentview mp4 per episode (implies --render)")
    ap.add_argument("--trace", action="store_true", help="record the policy's phase changes per episode")
    ap.add_argument("--set", nargs="*", default=[], help="ScriptedPolicy keyword overrides, key=value")
    args = ap.parse_args()
    os.environ.setdefault("MUJOCO_GL", "osmesa")
    os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")
    task_ids = parse_ids(args.tasks)
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(min(args.workers, len(task_ids))) as pool:
        per_task = pool.starmap(run_task, [(tid, args) for tid in task_ids])
    records = [r for recs in per_task for r in recs]
    by_task = {str(recs[0]["task"]): sum(r["success"] for r in recs) for recs in per_task if recs}
    n_ok = sum(r["success"] for r in records)
    summary = {"suite": SUITE, "trials_per_task": args.trials, "success": n_ok, "episodes": len(records)}
    summary["errors"] = sum("error" in r for r in records)
    summary |= {"rate": round(n_ok / max(len(records), 1), 3), "by_task": by_task, "overrides": args.set}
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
