"""Real LIBERO rollouts through `evaluate`: counting, errors, crashes, resume after kill -9, early validation."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, compose

from pi05eval.app import evaluate
from pi05eval.policy.bundle import BundleError

SHORT = ["suite=libero_spatial", "suite.tasks=[0]", "runner.max_steps=20", "runner.progress=false"]


def _processes() -> list[dict]:
    """Every process from /proc (no procps needed): pid, state, parent, process group and command line."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):  # not a process, or it ended meanwhile
            continue
        state, ppid, pgrp = stat[stat.rindex(")") + 2 :].split()[:3]
        out.append({"pid": int(d.name), "state": state, "ppid": int(ppid), "pgrp": int(pgrp), "cmdline": cmdline})
    return out


def _live_members(pgrp: int) -> list[dict]:
    return [p for p in _processes() if p["pgrp"] == pgrp and p["state"] != "Z"]


def _wait_for_a_record(run_dir: Path) -> None:
    """Until the run in `run_dir` (another process) has recorded its first episode, for at most 5 minutes."""
    episodes = run_dir / "episodes.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (episodes.exists() and episodes.read_text().count("\n") >= 1):
        time.sleep(0.1)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "episodes.jsonl").read_text().splitlines()]


def test_replanning_beyond_the_action_chunk_is_refused_before_any_episode(tmp_path) -> None:
    cfg = compose(["policy=noop", *SHORT, "suite.trials_per_task=1", "runner.replan_steps=11"])
    with pytest.raises(ValueError, match=r"runner.replan_steps=11 exceeds the 10 actions policy 'noop' predicts"):
        evaluate(cfg, tmp_path)
    assert not (tmp_path / "episodes.jsonl").exists() or not _records(tmp_path)


def test_holding_still_is_a_counted_failure(tmp_path) -> None:
    summary = evaluate(compose(["policy=noop", *SHORT, "suite.trials_per_task=1"]), tmp_path)
    (rec,) = _records(tmp_path)
    assert rec["status"] == "failure" and rec["success"] is False
    assert rec["steps"] == 30 and rec["calls"] == 4 and rec["latency"]["n"] == 4  # 10 wait + 20, replan every 5
    assert summary["success"] == {"successes": 0, "n": 1, "rate": 0.0, "ci95": summary["success"]["ci95"], "errors": 0}
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["versions"]["mujoco"] == "3.2.3" and manifest["versions"]["robosuite"]
    assert (tmp_path / "config.yaml").read_text().count("libero_spatial") >= 1


def test_bad_actions_and_policy_exceptions_are_episode_errors(tmp_path) -> None:
    cfg = compose([*SHORT, "policy=noop", "policy._target_=faulty_policies.FaultyPolicy", "suite.trials_per_task=5"])
    summary = evaluate(cfg, tmp_path)
    recs = sorted(_records(tmp_path), key=lambda r: r["trial"])
    assert [r["status"] for r in recs] == ["error", "error", "error", "error", "failure"]
    assert "non-finite" in recs[0]["error"]
    assert "shape (10, 6)" in recs[1]["error"]
    assert "policy exploded" in recs[2]["error"]
    assert "returned 3 actions, fewer than replan_steps=5" in recs[3]["error"]
    assert summary["success"]["errors"] == 4 and summary["success"]["n"] == 1


def test_a_segfaulting_worker_is_recorded_and_replaced(tmp_path) -> None:
    fault = "+runner.fault={task_id:0,trial:0,kind:segfault,at_call:2}"
    cfg = compose(["policy=noop", *SHORT, "suite.trials_per_task=2", "runner.fault=null", fault])
    summary = evaluate(cfg, tmp_path)
    recs = sorted(_records(tmp_path), key=lambda r: r["trial"])
    assert recs[0]["status"] == "error" and "SIGSEGV" in recs[0]["error"]
    assert recs[1]["status"] == "failure" and recs[1]["steps"] == 30  # the restarted worker ran trial 1 in full
    assert summary["success"]["errors"] == 1


def test_resume_after_kill_loses_nothing_and_duplicates_nothing(tmp_path) -> None:
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "pi05eval",
        "policy=noop",
        "suite=libero_spatial",
        "suite.tasks=[0]",
        "suite.trials_per_task=3",
        "runner.max_steps=5",
        f"output_dir={run_dir}",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _wait_for_a_record(run_dir)
    os.killpg(proc.pid, signal.SIGKILL)  # main process and env workers, mid-run
    proc.wait()
    before = _records(run_dir)
    assert 1 <= len(before) < 3, "killed after the first episode and before the last"

    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    after = _records(run_dir)
    assert sorted(r["trial"] for r in after) == [0, 1, 2]
    assert after[: len(before)] == before  # earlier records untouched
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["complete"] and summary["episodes"] == 3
    assert len(json.loads((run_dir / "manifest.json").read_text())["sessions"]) == 2


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_stops_at_once_keeping_what_finished(tmp_path, sig: signal.Signals, status: int) -> None:
    """SIGINT to the process group (what Ctrl-C sends) or SIGTERM (`timeout`, a scheduler): the episodes in flight are
    dropped, not waited for, and not recorded as errors; the summary is written as partial; the same command
    finishes the rest."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "pi05eval", "policy=noop", *SHORT, "suite.trials_per_task=3", "runner.num_envs=2"]
    cmd.append(f"output_dir={run_dir}")
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_a_record(run_dir)
    os.killpg(proc.pid, sig)
    try:
        out, err = proc.communicate(timeout=20)  # not the 30 s a worker mid-episode would be given to finish
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    out = (out + err).decode()
    assert proc.returncode == status and "Traceback" not in out, out[-3000:]
    assert "episodes on record; the same command with output_dir=" in out
    before = _records(run_dir)
    assert 1 <= len(before) < 3 and all(r["status"] == "failure" for r in before)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert not summary["complete"] and summary["episodes"] == len(before)
    deadline = time.time() + 10  # a child may still be exiting (reparented, its memory gone) when the main has ended
    while (alive := _live_members(proc.pid)) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive, f"processes of the run still alive: {alive}"

    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(r["trial"] for r in _records(run_dir)) == [0, 1, 2]
    assert json.loads((run_dir / "summary.json").read_text())["complete"]


def test_a_worker_terminated_from_outside_stops_the_run_without_error_records(tmp_path) -> None:
    """A scheduler preempting the job sends SIGTERM: the episode it cuts short is not the policy's or the simulator's
    failure, so it is not recorded (as a worker crash would be) and a rerun runs it."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "pi05eval", "policy=noop", *SHORT, "suite.trials_per_task=3", f"output_dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_for_a_record(run_dir)
        (worker,) = [p for p in _processes() if p["ppid"] == proc.pid and "spawn_main" in p["cmdline"]]
        os.kill(worker["pid"], signal.SIGTERM)  # the one env worker (the other child is multiprocessing's tracker)
        out = proc.communicate(timeout=60)[0].decode()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143 and "was terminated (SIGTERM from outside the run)" in out, out[-3000:]
    records = _records(run_dir)
    assert 1 <= len(records) < 3 and all(r["status"] == "failure" for r in records)
    assert not json.loads((run_dir / "summary.json").read_text())["complete"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["suite.tasks=[3,12]"], r"\[12\] out of range for libero_spatial: task ids are 0\.\.9"),
        (["suite.trials_per_task=60"], "exceeds the 50 initial states"),
        (["suite.suites=[libero_100]"], "unknown LIBERO suite"),
    ],
)
def test_bad_suite_selection_fails_before_simulation(tmp_path, overrides: list[str], message: str) -> None:
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=message):
        evaluate(compose(["policy=noop", *overrides]), tmp_path)
    assert time.perf_counter() - t0 < 20  # no env was built
    assert not (tmp_path / "episodes.jsonl").exists()


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "tiny"
    proc = subprocess.run(
        [sys.executable, "scripts/make_tiny_policy.py", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_tiny_pi05_policy_runs_a_libero_episode_end_to_end(tmp_path, tiny_bundle) -> None:
    cfg = compose(
        [
            "policy=eager_fp32",
            f"policy.checkpoint={tiny_bundle}",
            "policy.device=cpu",
            *SHORT,
            "suite.trials_per_task=1",
        ]
    )
    summary = evaluate(cfg, tmp_path)
    (rec,) = _records(tmp_path)
    assert rec["status"] == "failure" and rec["calls"] == 4  # random weights: it moves, it does not succeed
    assert set(rec["stage_ms"]) >= {"preprocess", "model", "postprocess"}
    assert rec["policy_info"]["prompt_truncated"] is False
    assert summary["latency_ms"]["n"] == 4


def test_the_command_line_runs_a_pi05_policy_in_a_fresh_process(tmp_path, tiny_bundle) -> None:
    """`python -m pi05eval` as a user types it: the suite's LIBERO import opens Mesa's GL library before the policy
    imports Triton, which used to crash the process (segfault) unless Triton was loaded first."""
    cmd = [sys.executable, "-m", "pi05eval", "policy=eager_fp32", f"policy.checkpoint={tiny_bundle}", *SHORT]
    cmd += ["policy.device=cpu", "suite.trials_per_task=1", f"output_dir={tmp_path}"]
    env = {**os.environ, "MUJOCO_GL": "osmesa", "PYOPENGL_PLATFORM": "osmesa"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    (rec,) = _records(tmp_path)
    assert rec["status"] == "failure" and rec["calls"] == 4


def test_a_bad_checkpoint_fails_before_any_simulation_naming_the_keys(tmp_path, tiny_bundle) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle, bad)
    weights = load_file(bad / "model.safetensors")
    missing = next(k for k in weights if k.endswith("time_mlp_in.weight"))
    del weights[missing]
    save_file(weights, bad / "model.safetensors")
    with pytest.raises(BundleError, match=r"missing key\(s\): time_mlp_in\.weight"):
        evaluate(compose(["policy=eager_bf16", f"policy.checkpoint={bad}", *SHORT]), tmp_path / "run")
    assert not (tmp_path / "run" / "episodes.jsonl").exists()


SIMULATED_PLANS = ["fp8", "trt_fp8", "int8", "w4a16", "nvfp4", "fp16"]


def test_every_precision_plan_runs_a_libero_episode_simulated_on_cpu(tmp_path, tiny_bundle, monkeypatch) -> None:
    """The simulated path of every preset: calibration frames recorded from the suite, ModelOpt fake quantization
    (NVFP4: pi05eval's rounding, ModelOpt's needs CUDA), a real episode, and the fidelity ledger in summary.json."""
    pytest.importorskip("modelopt")
    monkeypatch.setenv("PI05EVAL_CACHE", str(tmp_path / "cache"))
    calib = ["policy.precision.calibration.num_obs=2", "policy.precision.calibration.holdout=2"]
    for preset in SIMULATED_PLANS:
        run = tmp_path / preset
        cfg = compose(
            [
                "policy=eager_bf16",
                f"policy/precision={preset}",
                "policy.precision.simulate=true",
                *calib,
                f"policy.checkpoint={tiny_bundle}",
                "policy.device=cpu",
                *SHORT,
                "suite.trials_per_task=1",
                "runner.max_steps=10",
            ]
        )
        summary = evaluate(cfg, run)
        (rec,) = _records(run)
        assert rec["status"] == "failure", (preset, rec)  # ran to the step limit, no error
        if preset == "fp16":  # float formats run for real even when simulate=true: nothing to fake-quantize
            assert summary["simulated_precision"] is False and "latency_note" not in summary
        else:
            assert summary["simulated_precision"] is True and "not meaningful" in summary["latency_note"]
        fid = json.loads((run / "summary.json").read_text())["fidelity"]
        assert fid["plan"]["n"] == 2 and 0 < fid["plan"]["cosine"] <= 1 + 1e-9, (preset, fid)
        if preset != "fp16":  # a float-only plan has nothing to quantize one component at a time
            assert fid["plan"]["max_abs"] > 0, preset
    # the calibration frames were recorded once, from the run's suite, and reused
    assert len(list((tmp_path / "cache" / "calibration").glob("libero_spatial-*.npz"))) == 1


def test_calibration_frames_from_another_suite_are_refused(tmp_path, tiny_bundle, monkeypatch) -> None:
    import shutil

    from pi05eval.precision.plan import PrecisionError

    monkeypatch.setenv("PI05EVAL_CACHE", str(tmp_path / "cache"))
    calib_dir = tmp_path / "cache" / "calibration"
    base = [
        "policy=eager_bf16",
        "policy/precision=fp8",
        "policy.precision.simulate=true",
        "policy.precision.calibration.num_obs=1",
        "policy.precision.calibration.holdout=0",
        f"policy.checkpoint={tiny_bundle}",
        "policy.device=cpu",
        *SHORT,
        "suite.trials_per_task=1",
        "runner.max_steps=5",
    ]
    evaluate(compose(base), tmp_path / "a")
    (recorded,) = calib_dir.glob("*.npz")
    other = tmp_path / "spatial.npz"
    shutil.copy(recorded, other)
    with pytest.raises(PrecisionError, match="recorded on suite 'libero_spatial', this run evaluates 'libero_object'"):
        evaluate(
            compose([*base, "suite=libero_object", "suite.tasks=[0]", f"policy.precision.calibration.path={other}"]),
            tmp_path / "b",
        )
    assert not (tmp_path / "b" / "episodes.jsonl").exists()


@pytest.mark.parametrize(
    ("policy", "error"),
    [
        ("trt_fp8", r'pip install "pi05eval\[tensorrt\]"'),  # TensorRT cannot be installed here
        ("nvfp4", r"precision.prefix.attn=nvfp4 needs compute capability ≥ 10.0 .*this is a CPU.*simulate=true"),
        ("compile_bf16", None),
    ],
)
def test_missing_backends_and_hardware_fail_before_any_simulation(tmp_path, tiny_bundle, policy, error) -> None:
    overrides = [f"policy={policy}", f"policy.checkpoint={tiny_bundle}", "policy.device=cpu", *SHORT]
    if error is None:  # a bf16 plan with an unknown format on one component: the choices are listed
        overrides.append("policy.precision.expert.mlp=fp4")
        error = "unknown format 'fp4' for precision.expert.mlp; choices: fp32, bf16, fp16, fp8, int8, w4a16, nvfp4"
    t0 = time.perf_counter()
    with pytest.raises(Exception, match=error):
        evaluate(compose(overrides), tmp_path)
    assert time.perf_counter() - t0 < 30
    assert not (tmp_path / "episodes.jsonl").exists()


def test_a_real_fp8_plan_runs_reports_per_component_fidelity_and_reuses_its_scales(
    tmp_path, tiny_bundle, monkeypatch
) -> None:
    """Real FP8 kernels (torch's CPU `_scaled_mm`) in a LIBERO episode; the calibrated ranges are saved, so a second
    run skips calibration and reports the same fidelity."""
    pytest.importorskip("modelopt")
    monkeypatch.setenv("PI05EVAL_CACHE", str(tmp_path / "cache"))
    overrides = [
        "policy=eager_bf16",
        "policy/precision=fp8",
        "policy.precision.calibration.num_obs=2",
        "policy.precision.calibration.holdout=2",
        f"policy.checkpoint={tiny_bundle}",
        "policy.device=cpu",
        *SHORT,
        "suite.trials_per_task=1",
        "runner.max_steps=10",
    ]
    reports = []
    for run in ("first", "second"):
        summary = evaluate(compose(overrides), tmp_path / run)
        assert summary["simulated_precision"] is False and "latency_note" not in summary
        reports.append(json.loads((tmp_path / run / "manifest.json").read_text())["precision"])
    first, second = reports
    assert first["layers"] == {"fp8": first["layers"]["fp8"]} and first["layers"]["fp8"] > 0
    assert not first["scales_loaded"] and second["scales_loaded"]
    assert set(first["fidelity"]["components"]) == {"prefix.attn", "prefix.mlp", "expert.attn", "expert.mlp"}
    assert first["fidelity"]["components_measured_with"] == "real kernels"
    assert first["fidelity"]["plan"] == second["fidelity"]["plan"]
    assert first["fidelity"]["plan"]["max_abs"] > 0
