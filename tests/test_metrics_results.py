"""Wilson intervals, latency percentiles, and the run directory's append/recover/refuse behaviour."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from pi05eval.metrics import latency_summary, summarize, wilson_interval
from pi05eval.results import RunDir, RunDirError, unique_video_path


@pytest.mark.parametrize(
    ("k", "n", "lo", "hi"),
    [  # textbook values (Newcombe 1998, Table I; Agresti & Coull 1998)
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (10, 10, 0.7225, 1.0),
    ],
)
def test_wilson_interval_matches_published_values(k: int, n: int, lo: float, hi: float) -> None:
    got = wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=1e-4)


def test_wilson_interval_is_exact_at_zero_and_full_success() -> None:
    for n in range(1, 51):
        assert wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0, n


def test_latency_summary_percentiles() -> None:
    samples = list(np.arange(1, 101, dtype=float))  # 1..100 ms
    s = latency_summary(samples)
    assert s["n"] == 100 and s["max"] == 100 and s["mean"] == pytest.approx(50.5)
    assert s["p50"] == pytest.approx(50.5) and s["p90"] == pytest.approx(90.1) and s["p99"] == pytest.approx(99.01)
    assert latency_summary([]) == {"n": 0}


def _record(task: int, trial: int, status: str) -> dict:
    return {
        "suite": "libero_spatial",
        "task_id": task,
        "task": f"t{task}",
        "trial": trial,
        "status": status,
        "success": status == "success",
        "steps": 100,
        "sim_s": 2.0,
        "wall_s": 3.0,
        "latency_ms": [1.0, 3.0],
    }


def test_summary_counts_errors_apart() -> None:
    recs = [_record(0, 0, "success"), _record(0, 1, "failure"), _record(1, 0, "error"), _record(1, 1, "success")]
    s = summarize(recs, wall_s=36.0)
    assert s["success"]["successes"] == 2 and s["success"]["n"] == 3 and s["success"]["errors"] == 1
    assert s["tasks"][1]["n"] == 1 and s["tasks"][1]["errors"] == 1
    assert s["episodes_per_hour"] == pytest.approx(400.0)
    assert s["latency_ms"]["n"] == 8 and s["sim_steps_per_s"] == pytest.approx(50.0)


def test_append_survives_a_torn_last_line(tmp_path) -> None:
    rd = RunDir(tmp_path)
    rd.append(_record(0, 0, "success"))
    rd.append(_record(0, 1, "failure"))
    with (tmp_path / "episodes.jsonl").open("a") as fh:  # what kill -9 mid-write leaves behind
        fh.write('{"suite": "libero_spatial", "task_id": 0, "tri')
    assert [r["trial"] for r in rd.load_records()] == [0, 1]
    rd.append(_record(0, 2, "success"))
    lines = (tmp_path / "episodes.jsonl").read_text().splitlines()
    assert [json.loads(x)["trial"] for x in lines] == [0, 1, 2]


def test_later_record_supersedes_a_retried_error(tmp_path) -> None:
    rd = RunDir(tmp_path)
    rd.append(_record(0, 0, "error"))
    rd.append(_record(0, 0, "success"))
    assert rd.latest_by_key()[("libero_spatial", 0, 0)]["status"] == "success"


def test_a_dir_of_another_config_is_refused(tmp_path) -> None:
    rd = RunDir(tmp_path)
    assert rd.check_fingerprint({"policy": "a"}) is False
    rd.write_manifest({"fingerprint": {"policy": "a"}})
    assert rd.check_fingerprint({"policy": "a"}) is True
    with pytest.raises(RunDirError, match="policy: 'a' -> 'b'"):
        rd.check_fingerprint({"policy": "b"})


def test_a_second_writer_of_a_run_dir_is_refused_naming_the_first(tmp_path) -> None:
    from conftest import compose

    from pi05eval.app import evaluate

    cfg = compose(["policy=noop", "suite=libero_spatial", "suite.tasks=[0]", "suite.trials_per_task=1"])
    with RunDir(tmp_path).hold():
        with pytest.raises(RunDirError, match=rf"in use by pid {os.getpid()} on .*a rerun then resumes"):
            evaluate(cfg, tmp_path)
        assert not (tmp_path / "manifest.json").exists(), "refused before writing anything"
    with RunDir(tmp_path).hold():  # released when the first writer ends
        pass


def test_a_file_system_without_locks_runs_unguarded_with_a_warning(tmp_path, monkeypatch, caplog) -> None:
    import errno
    import fcntl

    def no_locks(fd, op) -> None:  # Lustre mounted without flock answers this way; no such mount exists here
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with RunDir(tmp_path).hold():
        pass
    assert "nothing stops a second process" in caplog.text


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_dir_is_refused_as_non_root(tmp_path) -> None:
    tmp_path.chmod(0o500)
    with pytest.raises(RunDirError, match="not writable"):
        RunDir(tmp_path / "run")


def test_unwritable_dir_is_refused(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(RunDirError, match="not writable"):
        RunDir(blocker / "run")


def test_videos_are_never_overwritten(tmp_path) -> None:
    first = unique_video_path(tmp_path, "libero_spatial", 3, 7, "failure")
    first.write_bytes(b"x")
    second = unique_video_path(tmp_path, "libero_spatial", 3, 7, "failure")
    assert first.name == "libero_spatial_task03_trial07_failure.mp4" and second != first and not second.exists()
