"""W&B logging: offline runs hold the summary, the task table, the latency histogram and videos (read back from the
run's own `.wandb` file); an unreachable server or a missing package never costs an evaluation."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import REPO

from pi05eval.metrics import summarize
from pi05eval.results import RunDir
from pi05eval.tracking import WandbLogger, failures_first, run_name, summary_metrics

pytest.importorskip("wandb", reason='W&B tests need pip install "pi05eval[wandb]"')


# ---- reading an offline run back: the `.wandb` file is a LevelDB-style log of protobuf `Record`s -----------------
def _wandb_records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, f"{path} is not a W&B run file"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a record is complete
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""
    return records


def read_wandb_run(run_folder: Path) -> dict[str, Any]:
    """Group, name, config, merged summary and history rows of one offline run folder (`offline-run-*`)."""
    (wandb_file,) = run_folder.glob("run-*.wandb")
    out: dict[str, Any] = {"config": {}, "summary": {}, "history": [], "files": run_folder / "files"}
    for rec in _wandb_records(wandb_file):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out.update(group=rec.run.run_group, name=rec.run.display_name, tags=list(rec.run.tags))
            out["config"].update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
        elif kind == "config":
            out["config"].update({u.key: json.loads(u.value_json) for u in rec.config.update})
        elif kind == "summary":
            for u in rec.summary.update:
                _set(out["summary"], [u.key] if u.key else list(u.nested_key), json.loads(u.value_json))
        elif kind == "history":
            row: dict[str, Any] = {}
            for u in rec.history.item:
                _set(row, [u.key] if u.key else list(u.nested_key), json.loads(u.value_json))
            out["history"].append(row)
    return out


def _set(d: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        d = d.setdefault(key, {})
    d[path[-1]] = value


def offline_runs(folder: Path) -> list[Path]:
    return sorted(folder.rglob("offline-run-*"))


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """W&B writes only under tmp_path (no login, no files in $HOME)."""
    for var in ("WANDB_BASE_URL", "WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_ENTITY"):
        monkeypatch.delenv(var, raising=False)
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


# ---- a run dir with hand-made episodes -------------------------------------------------------------------------
def _record(task: int, trial: int, status: str, latency: list[float], video: str | None = None) -> dict[str, Any]:
    return {"suite": "libero_spatial", "task_id": task, "task": f"task_{task}", "language": f"do task {task}",
            "trial": trial, "status": status, "success": status == "success", "steps": 50, "sim_s": 1.0,
            "wall_s": 2.0, "latency": {"p50": float(np.median(latency))} if latency else {"n": 0},
            "latency_ms": latency, "stage_ms": {"denoise": [x / 2 for x in latency]}, "video": video,
            "error": "Traceback ..." if status == "error" else None}  # fmt: skip


def _write_mp4(path: Path) -> str:
    import imageio.v2 as imageio

    frames = [np.full((32, 32, 3), 40 * i, dtype=np.uint8) for i in range(5)]
    path.parent.mkdir(parents=True, exist_ok=True)
    imageio.mimwrite(path, frames, fps=5, macro_block_size=1)
    return str(path)


def _run_dir(root: Path) -> tuple[Path, list[dict[str, Any]]]:
    run = root / "run"
    records = [
        _record(0, 0, "success", [10.0, 12.0], _write_mp4(run / "videos" / "t0_success.mp4")),
        _record(0, 1, "failure", [11.0, 30.0], _write_mp4(run / "videos" / "t0_failure.mp4")),
        _record(1, 0, "success", [9.0, 13.0]),
        _record(1, 1, "error", []),
    ]
    rd = RunDir(run)
    for r in records:
        rd.append(r)
    rd.write_manifest({"versions": {"torch": "x"}, "build_s": 1.5})
    return run, records


CONFIG = {"policy": {"name": "eager_bf16", "num_steps": 5, "engine": "eager"}, "suite": {"name": "libero_spatial"}}


def test_offline_run_holds_summary_table_histogram_and_videos(wandb_env: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_env / "wandb_dir"))
    run_dir, records = _run_dir(wandb_env)
    summary = {**summarize(records, wall_s=36.0), "build_s": 1.5, "complete": True, "fidelity": {"action_mse": 0.02}}
    logger = WandbLogger(project="pi05eval-test", tags=["cpu"], max_videos=1)
    logger.log_config(CONFIG, str(run_dir))
    for r in records:
        logger.log_episode(r)
    logger.log_summary(summary)
    logger.close()

    (folder,) = offline_runs(wandb_env / "wandb_dir")  # WANDB_DIR wins over the run dir
    run = read_wandb_run(folder)
    assert run["name"] == "eager_bf16-libero_spatial-5steps" and run["tags"] == ["cpu"] and run["group"] == ""
    assert run["config"]["policy"]["num_steps"] == 5 and run["config"]["run_dir"] == str(run_dir.resolve())
    assert run["config"]["environment"]["versions"] == {"torch": "x"}
    s = run["summary"]
    # 2 successes of 3 finished episodes (the error counted apart); Wilson 95% CI for 2/3 is [0.2077, 0.9385]
    assert s["success/rate"] == pytest.approx(2 / 3) and s["success/errors"] == 1 and s["success/n"] == 3
    assert (s["success/ci95_low"], s["success/ci95_high"]) == pytest.approx((0.2077, 0.9385), abs=1e-4)
    assert s["success/libero_spatial/rate"] == pytest.approx(2 / 3)
    assert s["task/libero_spatial/00/rate"] == 0.5 and s["task/libero_spatial/01/rate"] == 1.0
    assert s["task/libero_spatial/01/errors"] == 1
    assert s["latency_ms/p50"] == pytest.approx(11.5) and s["latency_ms/n"] == 6  # median of 9,10,11,12,13,30
    assert s["stage_ms/denoise/p50"] == pytest.approx(5.75)
    assert s["fidelity/action_mse"] == 0.02 and s["build_s"] == 1.5 and s["episodes_per_hour"] == pytest.approx(400)
    assert s["latency_ms/histogram"]["_type"] == "histogram" and sum(s["latency_ms/histogram"]["values"]) == 6
    # one W&B step per episode
    episodes = [h for h in run["history"] if "episode/index" in h]
    assert [h["episode/success"] for h in episodes] == [1, 0, 1, 0]
    assert [h["episode/error"] for h in episodes] == [0, 0, 0, 1] and episodes[0]["episode/latency_p50_ms"] == 11.0
    # the per-task table
    (table_file,) = (run["files"] / "media" / "table").glob("tasks_*.table.json")
    table = json.loads(table_file.read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert [(r["task_id"], r["successes"], r["n"], r["errors"]) for r in rows] == [(0, 1, 2, 0), (1, 1, 1, 1)]
    assert rows[0]["p50_ms"] == pytest.approx(11.5) and rows[1]["p50_ms"] == pytest.approx(11.0)
    # max_videos=1: the failure's video, not the success's
    videos = [p.name for p in (run["files"] / "media").rglob("*.mp4")]
    assert len(videos) == 1 and "failure" in videos[0], videos


def test_disabled_mode_writes_nothing_and_never_fails(wandb_env: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run_dir, records = _run_dir(wandb_env)
    logger = WandbLogger()
    logger.log_config(CONFIG, str(run_dir))
    logger.log_episode(records[0])
    logger.log_summary(summarize(records))
    logger.close()
    assert not (run_dir / "wandb").exists() and not offline_runs(wandb_env)


def test_missing_wandb_is_a_clear_error_when_the_logger_is_built(monkeypatch) -> None:
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
        with pytest.raises(ImportError, match=r'pip install "pi05eval\[wandb\]"'):
            WandbLogger()
    with pytest.raises(ValueError, match=r"logger\.mode"):
        WandbLogger(mode="sometimes")


def test_unreachable_server_falls_back_to_offline_and_the_evaluation_finishes(wandb_env: Path) -> None:
    env = {**os.environ, "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_API_KEY": "0" * 40, "WANDB_MODE": "online"}
    out = wandb_env / "run"
    cmd = [sys.executable, "-m", "pi05eval", "policy=noop", "suite.tasks=[0]", "suite.trials_per_task=1",
           "runner.max_steps=5", "runner.progress=false", "logger=wandb", "logger.init_timeout=2",
           f"output_dir={out}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "logging offline instead" in proc.stdout + proc.stderr
    assert json.loads((out / "summary.json").read_text())["complete"] is True
    (folder,) = offline_runs(out / "wandb")
    assert read_wandb_run(folder)["summary"]["success/n"] == 1


def test_summary_metrics_and_names_without_wandb_calls() -> None:
    summary = summarize([_record(0, 0, "success", [5.0]), _record(2, 0, "failure", [7.0])])
    m = summary_metrics(summary)
    assert m["task/libero_spatial/02/rate"] == 0.0 and m["latency_ms/p50"] == 6.0
    assert "fidelity" not in " ".join(m) and "stage_ms/denoise/p99" in m
    assert run_name({"policy": {"name": "noop"}, "suite": {"name": "libero_10"}}) == "noop-libero_10"
    recs = [_record(0, i, s, [1.0], video=f"v{i}") for i, s in enumerate(["success", "failure", "error", "success"])]
    assert [r["status"] for r in failures_first(recs, 3)] == ["error", "failure", "success"]
