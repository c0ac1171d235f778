"""Multiruns: every job of one sweep logs into one W&B group (sequential and joblib launchers, real tiny jobs);
one GPU per parallel worker process; the sweep configs select what exists."""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONF_DIR, REPO

from pi05eval.launcher import claim_gpu

TINY_JOBS = ["policy=noop", "runner.max_steps=5,10", "suite.tasks=[0]", "suite.trials_per_task=1",
             "runner.progress=false", "logger=wandb", "logger.mode=offline"]  # fmt: skip


def run_multirun(root: Path, *extra: str, env: dict[str, str] | None = None) -> Path:
    """`python -m pi05eval -m <tiny jobs>` with the sweep dir named by `${now:...}`; returns the sweep dir."""
    root.mkdir(parents=True, exist_ok=True)
    sweep_dir = "hydra.sweep.dir=" + str(root / "sweep_${now:%H-%M-%S-%f}")
    env = {**os.environ, "WANDB_SILENT": "true", **(env or {})}
    for var in ("WANDB_DIR", "WANDB_MODE", "WANDB_BASE_URL"):
        env.pop(var, None)
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        env[var] = str(root / var.lower())
    cmd = [sys.executable, "-m", "pi05eval", "-m", *TINY_JOBS, sweep_dir, *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (sweep,) = root.glob("sweep_*")
    return sweep


def make_tiny_sweep(base: Path) -> Path:
    """One real two-job sweep per test session (shared with test_report.py): noop, 5 and 10 steps, W&B offline."""
    root = base / "tiny_sweep"
    if not (root / "DONE").exists():
        sweep = run_multirun(root)
        (root / "DONE").write_text(str(sweep))
    return Path((root / "DONE").read_text())


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("wandb", reason='needs pip install "pi05eval[wandb]"')
    return make_tiny_sweep(tmp_path_factory.getbasetemp())


def _groups(sweep: Path) -> dict[str, str]:
    from test_tracking import offline_runs, read_wandb_run

    runs = {}
    for job in sorted(p for p in sweep.iterdir() if (p / "manifest.json").exists()):
        (folder,) = offline_runs(job / "wandb")
        runs[job.name] = read_wandb_run(folder)
    return runs


def test_multirun_jobs_share_one_wandb_group(tiny_sweep: Path) -> None:
    runs = _groups(tiny_sweep)
    assert sorted(runs) == ["0_noop_libero_spatial", "1_noop_libero_spatial"]
    # the group is the sweep dir's name, whose ${now:...} (to the microsecond) was resolved once for both jobs
    assert {r["group"] for r in runs.values()} == {tiny_sweep.name}
    assert [r["config"]["runner"]["max_steps"] for r in runs.values()] == [5, 10]
    assert [r["config"]["hydra_job"]["job_num"] for r in runs.values()] == [0, 1]
    assert all(r["summary"]["success/n"] == 1 and r["summary"]["complete"] for r in runs.values())


def test_joblib_launcher_runs_jobs_in_worker_processes_with_one_gpu_each(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason='needs pip install "pi05eval[joblib]"')
    pytest.importorskip("wandb", reason='needs pip install "pi05eval[wandb]"')
    # GPU ids are only handed out here (the noop policy never touches CUDA), so this runs on any machine
    sweep = run_multirun(tmp_path, "hydra/launcher=parallel", env={"CUDA_VISIBLE_DEVICES": "3,5"})
    runs = _groups(sweep)
    assert len(runs) == 2 and {r["group"] for r in runs.values()} == {sweep.name}
    assert all(r["summary"]["success/n"] == 1 and r["summary"]["success/errors"] == 0 for r in runs.values())
    claims = {}  # pid -> GPU, from each job's log
    for job in runs:
        log = (sweep / job / "app.log").read_text()
        m = re.search(r"\(pid (\d+)\): CUDA_VISIBLE_DEVICES=(\d+)", log)
        assert m, log[-2000:]
        claims.setdefault(m.group(1), set()).add(m.group(2))
    assert all(len(g) == 1 and g <= {"3", "5"} for g in claims.values())  # a worker keeps its GPU
    assert len({next(iter(g)) for g in claims.values()}) == len(claims)  # workers never share one


def _claim(lock_dir: Path, ready, release, out) -> None:
    first = claim_gpu(["0", "1"], lock_dir)
    out.put((os.getpid(), first, claim_gpu(["0", "1"], lock_dir)))
    ready.wait()
    release.wait()


def test_claim_gpu_gives_each_live_process_its_own_gpu(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    ready, release, out = ctx.Barrier(3), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_claim, args=(tmp_path, ready, release, out)) for _ in range(2)]
    for p in procs:
        p.start()
    ready.wait(timeout=30)  # both hold their claim now
    got = [out.get(timeout=30) for _ in procs]
    assert all(first == again for _, first, again in got)  # stable within a process
    assert sorted(first for _, first, _ in got) == ["0", "1"]
    assert claim_gpu([], tmp_path) is None
    release.set()
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0


def _hydra_cfg(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def test_sweep_experiments_sweep_what_exists() -> None:
    steps = _hydra_cfg(["experiment=steps_sweep"]).hydra
    assert [int(s) for s in str(steps.sweeper.params["policy.num_steps"]).split(",")] == [1, 2, 3, 5, 10]
    assert "steps_sweep" in steps.sweep.dir
    compare = _hydra_cfg(["experiment=backend_compare"]).hydra
    policies = str(compare.sweeper.params["policy"]).split(",")
    assert len(policies) >= 2 and all((CONF_DIR / "policy" / f"{p}.yaml").exists() for p in policies)
    assert "backend_compare" in compare.sweep.dir


def test_launcher_configs_compose() -> None:
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason='needs pip install "pi05eval[joblib]"')
    parallel = _hydra_cfg(["hydra/launcher=parallel"]).hydra
    assert parallel.launcher._target_.endswith("JoblibLauncher") and parallel.launcher.n_jobs >= 1
    assert parallel.callbacks.parallel_job_setup._target_ == "pi05eval.launcher.ParallelJobSetup"
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason='needs pip install "pi05eval[slurm]"')
    slurm = _hydra_cfg(["hydra/launcher=slurm"]).hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher") and slurm.gpus_per_node == 1
