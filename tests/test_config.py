"""Every config composes and validates; unknown names are rejected with the valid choices listed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import CONF_DIR, REPO, compose
from omegaconf import OmegaConf

from pi05eval.app import runner_config, suite_config

GROUPS = ("policy", "suite", "runner", "logger", "experiment")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in options(g)])
def test_every_config_composes_and_validates(group: str, option: str) -> None:
    cfg = compose([f"{group}={option}"])
    suite = suite_config(cfg.suite)
    runner = runner_config(cfg.runner)
    assert suite.trials_per_task >= 1 and runner.num_envs >= 1
    assert OmegaConf.to_container(cfg, resolve=False)  # everything is plain data
    if group == "policy":
        # the file name is the name recorded in results
        assert cfg.policy.name == option
        assert "_target_" in cfg.policy


def test_suite_configs_cover_the_standard_suites() -> None:
    assert {"libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90", "libero_4"} <= set(
        options("suite")
    )
    assert list(compose(["suite=libero_4"]).suite.suites) == [
        "libero_spatial",
        "libero_object",
        "libero_goal",
        "libero_10",
    ]


@pytest.mark.parametrize("group", ["policy", "suite", "runner", "logger"])
def test_unknown_option_lists_the_choices(group: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pi05eval", f"{group}=no_such_option"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "no_such_option" in proc.stderr
    for choice in options(group):
        assert choice in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["policy=trt_fp8"], "MissingBackendError: engine=tensorrt needs torch-tensorrt"),
        (["policy=compile_bf16", "policy.checkpoint=no/such/bundle"], "BundleError: "),
        (["policy=noop", "runner.replan_steps=11"], "ValueError: runner.replan_steps=11 exceeds"),
    ],
)
def test_the_command_line_states_a_setup_error_without_a_traceback(overrides, message, tmp_path) -> None:
    cmd = [sys.executable, "-m", "pi05eval", *overrides, f"output_dir={tmp_path}", "suite.tasks=[0]"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert message in out and "Traceback" not in out, out[-3000:]
    full = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=180, env={**os.environ, "HYDRA_FULL_ERROR": "1"}
    )
    assert full.returncode != 0 and "Traceback" in full.stderr


def test_invalid_runner_values_fail_with_the_key_named() -> None:
    with pytest.raises(ValueError, match=r"runner\.video"):
        runner_config(compose(["runner.video=sometimes"]).runner)
    with pytest.raises(ValueError, match=r"runner\.num_envs"):
        runner_config(compose(["runner.num_envs=0"]).runner)
    with pytest.raises(ValueError, match="exceeds the 50 initial states"):
        suite_config(compose(["suite.trials_per_task=51"]).suite)
    for tasks in ("[a]", "[]", "[1.5]"):
        with pytest.raises(ValueError, match=r"suite\.tasks must be task ids"):
            suite_config(compose([f"suite.tasks={tasks}"]).suite)


def test_one_task_id_selects_that_task() -> None:
    assert suite_config(compose(["suite.tasks=3"]).suite).tasks == (3,)
    assert suite_config(compose(["suite.tasks=[0,3]"]).suite).tasks == (0, 3)
    assert suite_config(compose([]).suite).tasks is None


def test_the_scripted_policy_follows_the_runners_replanning() -> None:
    """It estimates the arm's speed from the actions the runner executes between its calls."""
    from hydra.utils import instantiate

    for replan in (5, 3):
        cfg = compose(["policy=scripted", f"runner.replan_steps={replan}"])
        assert instantiate(cfg.policy).replan_steps == replan


def test_a_command_interrupted_by_ctrl_c_or_sigterm_ends_with_the_signals_status(caplog, monkeypatch) -> None:
    import signal

    from pi05eval.errors import TRACEBACK_ENV, run_command

    def ctrl_c(message: str = "") -> None:
        raise KeyboardInterrupt(message) if message else KeyboardInterrupt

    def sigterm() -> None:  # a real SIGTERM to this process, while the command runs
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    before = signal.getsignal(signal.SIGTERM)
    for body, status, line in [
        (ctrl_c, 130, "interrupted"),
        (lambda: ctrl_c("3 of 5"), 130, "3 of 5"),
        (sigterm, 143, "interrupted"),
    ]:
        with pytest.raises(SystemExit) as ended:
            run_command(body)
        assert ended.value.code == status and caplog.records[-1].getMessage() == line
    assert signal.getsignal(signal.SIGTERM) is before, "the command's SIGTERM handler is removed after it"
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(KeyboardInterrupt):
        run_command(ctrl_c)
