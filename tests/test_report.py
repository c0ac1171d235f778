"""`python -m pi05eval.report` on the run dirs of a real tiny sweep: one table row per run, readable PNG plots,
incomplete runs flagged from episodes.jsonl alone (never modified), the Pareto frontier, W&B offline."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from test_sweep import tiny_sweep  # noqa: F401  (the session's real two-job sweep)

from pi05eval.plots import pareto_front
from pi05eval.report import load_runs, make_labels, markdown_table

pytest.importorskip("matplotlib", reason='the report needs pip install "pi05eval[report]"')


def _report(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pi05eval.report", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _table_rows(markdown: str) -> list[list[str]]:
    lines = [ln for ln in markdown.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]  # skip header and rule


def assert_readable_png(path: Path) -> None:
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert width >= 600 and height >= 400 and len(data) > 15_000, (width, height, len(data))
    pixels = np.asarray(Image.open(path).convert("L"), dtype=np.float64)  # [H, W]
    assert pixels.std() > 5 and (pixels < 128).mean() > 0.005  # drawn on, not a blank canvas


def test_report_of_a_real_sweep_writes_table_and_plots(tiny_sweep: Path, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "report"
    proc = _report(str(tiny_sweep), "--out", str(out))
    rows = _table_rows((out / "report.md").read_text())
    assert len(rows) == 2 and _table_rows(proc.stdout) == rows  # one row per run
    assert [r[0] for r in rows] == ["0_noop_libero_spatial", "1_noop_libero_spatial"]
    header = [c.strip() for c in (out / "report.md").read_text().split("\n")[2].strip("|").split("|")]
    cells = dict(zip(header, rows[0], strict=True))
    assert cells["policy"] == "noop" and cells["libero_spatial"].startswith("0.0% [0.0, 79.3] (0/1)")
    assert cells["complete"] == "yes" and cells["errors"] == "0" and float(cells["p50 ms"]) > 0
    for name in ("pareto.png", "latency.png"):
        assert_readable_png(out / name)
    data = json.loads((out / "report.json").read_text())
    assert [d["label"] for d in data] == ["noop max_steps=5", "noop max_steps=10"]
    assert all(d["complete"] and d["episodes"] == 1 and d["latency"]["n"] >= 1 for d in data)


def test_partial_sweep_is_reported_and_left_untouched(tiny_sweep: Path, tmp_path: Path) -> None:  # noqa: F811
    sweep = tmp_path / "sweep"
    shutil.copytree(tiny_sweep, sweep, ignore=shutil.ignore_patterns("wandb"))
    killed = sweep / "1_noop_libero_spatial"
    (killed / "summary.json").unlink()  # what a job killed mid-run leaves: no summary, a torn last line
    with (killed / "episodes.jsonl").open("a") as fh:
        fh.write('{"suite": "libero_spatial", "task_id": 0, "tri')
    before = (killed / "episodes.jsonl").read_bytes()
    config = (killed / "config.yaml").read_text().replace("trials_per_task: 1", "trials_per_task: 3")
    (killed / "config.yaml").write_text(config)  # the job asked for 3 trials and recorded 1

    proc = _report(str(sweep))  # no --out: into the sweep dir
    rows = {r[0]: r for r in _table_rows((sweep / "report.md").read_text())}
    assert rows["1_noop_libero_spatial"][-1] == "no (1/3)" and rows["0_noop_libero_spatial"][-1] == "yes"
    assert "incomplete runs: 1_noop_libero_spatial" in proc.stdout
    assert (killed / "episodes.jsonl").read_bytes() == before  # the report never cuts a line a job is writing
    assert_readable_png(sweep / "pareto.png")


def test_precision_column_shows_the_plan_label(tiny_sweep: Path, tmp_path: Path) -> None:  # noqa: F811
    """A run's precision is its config's whole plan mapping; the table shows its short label."""
    import yaml
    from conftest import compose
    from omegaconf import OmegaConf

    sweep = tmp_path / "sweep"
    shutil.copytree(tiny_sweep, sweep, ignore=shutil.ignore_patterns("wandb"))
    plan = compose(["policy=compile_bf16", "policy.precision.prefix.mlp=fp8"]).policy.precision
    config_path = sweep / "0_noop_libero_spatial" / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["policy"]["precision"] = OmegaConf.to_container(plan, resolve=True)
    config_path.write_text(yaml.safe_dump(config))
    header, *_ = [ln for ln in _report(str(sweep)).stdout.splitlines() if ln.startswith("|")]
    column = [c.strip() for c in header.strip("|").split("|")].index("precision")
    rows = {r[0]: r for r in _table_rows((sweep / "report.md").read_text())}
    assert rows["0_noop_libero_spatial"][column] == "bf16+prefix.mlp=fp8"
    assert rows["1_noop_libero_spatial"][column] == "-"  # noop: no plan


def test_report_logs_to_wandb_offline(tiny_sweep: Path, tmp_path: Path, monkeypatch) -> None:  # noqa: F811
    pytest.importorskip("wandb")
    from test_tracking import offline_runs, read_wandb_run

    env_vars = {"WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(tmp_path / "cfg"), "WANDB_CACHE_DIR": str(tmp_path)}
    for k, v in env_vars.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    out = tmp_path / "report"
    _report(str(tiny_sweep), "--out", str(out), "--wandb", "--wandb-mode", "offline", "--group", "g1")
    (folder,) = offline_runs(out)
    run = read_wandb_run(folder)
    assert run["group"] == "g1" and run["summary"]["report/runs"]["_type"] == "table-file"
    assert {p.name.split("_")[0] for p in (run["files"] / "media" / "images").rglob("*.png")} == {"pareto", "latency"}
    assert (run["files"] / "report.md").read_text() == (out / "report.md").read_text()


def test_pareto_front_keeps_only_undominated_runs() -> None:
    # (latency ms, success %): (15, 40) loses to (10, 50); (30, 80) ties (20, 80) on success but is slower
    points = [(10.0, 50.0), (20.0, 80.0), (15.0, 40.0), (30.0, 80.0), (5.0, 10.0), (40.0, 95.0)]
    assert pareto_front(points) == [4, 0, 1, 5]


def test_the_pareto_plot_draws_runs_at_no_and_full_success(tmp_path: Path) -> None:
    """Noop baselines score 0 %, easy tasks 100 %: their intervals end at the rate (from older summaries, a rounding
    error inside it), which must not make a negative error bar."""
    from pi05eval.plots import pareto_plot
    from pi05eval.report import RunResult

    def run(name: str, k: int, n: int, ci95: tuple[float, float], p50: float) -> RunResult:
        success = {"successes": k, "n": n, "rate": k / n, "ci95": ci95, "errors": 0}
        latency = {"n": 3, "p50": p50, "p99": p50 * 1.1}
        return RunResult(name=name, path=name, policy=name, engine=None, precision=None, num_steps=None,
                         suites={"libero_spatial": success}, success=success, latency=latency,
                         latency_ms=[p50] * 3, fidelity=None, episodes=n, expected=n, complete=True, build_s=None,
                         label=name)  # fmt: skip

    runs = [
        run("noop", 0, 50, (5e-17, 0.0713), 0.1),
        run("scripted", 10, 10, (0.7225, 1.0 - 1e-16), 0.5),
        run("pi05", 7, 10, (0.3968, 0.8922), 10.0),
    ]
    assert_readable_png(pareto_plot(runs, tmp_path / "pareto.png"))


def test_labels_name_only_what_varies() -> None:
    a = {"policy": {"name": "eager_bf16", "num_steps": 5}, "suite": {"name": "libero_10"}, "output_dir": "x"}
    b = {"policy": {"name": "eager_bf16", "num_steps": 10}, "suite": {"name": "libero_10"}, "output_dir": "y"}
    c = {"policy": {"name": "trt_fp8", "engine": "tensorrt"}, "suite": {"name": "libero_10"}, "output_dir": "z"}
    assert make_labels([a, b], ["eager_bf16"] * 2) == ["eager_bf16 steps=5", "eager_bf16 steps=10"]
    assert make_labels([a, c], ["eager_bf16", "trt_fp8"]) == ["eager_bf16 steps=5", "trt_fp8"]
    assert make_labels([a, a], ["eager_bf16"] * 2) == ["eager_bf16 #0", "eager_bf16 #1"]


def test_no_run_dirs_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such run"):
        load_runs([tmp_path / "missing"])
    assert load_runs([tmp_path]) == []
    assert markdown_table([]).count("\n") == 1  # header only
