"""Env worker processes on real LIBERO: a run stopped mid-episode keeps whole videos of the episodes on record."""

from __future__ import annotations

from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest

from pi05eval.env.libero_env import configure_rendering
from pi05eval.env.suite import EpisodeSpec, SuiteConfig, load_tasks
from pi05eval.env.worker import WorkerHandle, WorkerOptions, _write_video


def _frames(path: Path) -> int:
    return sum(1 for _ in imageio.get_reader(path))


def test_a_stopped_worker_finishes_the_video_of_the_episode_it_reported(tmp_path: Path) -> None:
    """The worker reports an episode done while its video is still encoding; stopping it at once (Ctrl-C may come
    at any moment) must leave the reported video whole."""
    (task,) = load_tasks(SuiteConfig(name="libero_spatial", suites=("libero_spatial",), tasks=(0,)))
    opts = WorkerOptions(
        replan_steps=5,
        num_steps_wait=10,
        max_steps=100,
        lazy_render=True,
        privileged=False,
        mujoco_gl=configure_rendering(None),
        video="all",
        video_dir=str(tmp_path),
    )
    worker = WorkerHandle(0, opts)
    try:
        worker.send("episode", EpisodeSpec(task, 0))
        while (msg := worker.conn.recv())[0] == "obs":
            worker.send("actions", np.zeros((5, 7)))
        kind, record = msg
        worker.stop()
        assert kind == "done" and record["calls"] == 20 and record["video"]
        assert not worker.proc.is_alive()
        assert _frames(Path(record["video"])) == record["calls"]  # one frame per policy query
        assert not list(tmp_path.glob("*.part.mp4"))
    finally:
        worker.kill()


def test_a_video_write_cut_short_leaves_no_file_under_the_final_name(tmp_path: Path) -> None:
    frames = [np.zeros((224, 448, 3), np.uint8), np.zeros((10, 10), np.uint8)]  # the second frame cannot be encoded
    final = tmp_path / "libero_spatial_task00_trial00_failure.mp4"
    with pytest.raises(ValueError):
        _write_video(final, frames, fps=10)
    assert not final.exists()
