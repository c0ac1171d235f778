"""Orchestration only: compose → validate → build policy → run episodes → write results → log.

Everything that can be checked without simulating (config values, output dir, task ids, the policy's checkpoint
and whether it supports each task) is checked before the first env starts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from pi05eval.env.libero_env import configure_rendering, load_triton_before_gl
from pi05eval.env.suite import SuiteConfig, episodes_of, load_tasks
from pi05eval.env.worker import FaultSpec
from pi05eval.errors import run_command
from pi05eval.metrics import format_table, latency_summary, summarize
from pi05eval.policy.base import Policy
from pi05eval.results import RunDir, environment_info
from pi05eval.runner import RunnerConfig, run

log = logging.getLogger("pi05eval")
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def task_ids(tasks: Any) -> tuple[int, ...] | None:
    """`suite.tasks` as given on the command line: null (all), one id (`suite.tasks=3`) or a list of ids."""
    if tasks is None:
        return None
    ids = tasks if isinstance(tasks, list | tuple) else [tasks]
    bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int)]
    if bad or not ids:
        raise ValueError(f"suite.tasks must be task ids (integers), e.g. [0,3] or 3; got {tasks!r}")
    return tuple(ids)


def suite_config(cfg: DictConfig) -> SuiteConfig:
    d = OmegaConf.to_container(cfg, resolve=True)
    d["suites"] = tuple(d["suites"])
    d["tasks"] = task_ids(d.get("tasks"))
    return SuiteConfig(**d)


def runner_config(cfg: DictConfig) -> RunnerConfig:
    d = OmegaConf.to_container(cfg, resolve=True)
    if d.get("fault") is not None:
        d["fault"] = FaultSpec(**d["fault"])
    return RunnerConfig(**d)


def build_policy(cfg: DictConfig) -> tuple[Policy, float]:
    t0 = time.perf_counter()
    try:
        policy = instantiate(cfg, _convert_="all")
    except InstantiationException as e:  # surface the policy's own error (e.g. CheckpointError naming the keys)
        if e.__cause__ is None:
            raise
        raise e.__cause__ from None
    if not isinstance(policy, Policy):
        raise TypeError(f"{cfg.get('_target_')} did not build a Policy (reset/infer/check_task/warmup)")
    return policy, time.perf_counter() - t0


class Progress:
    """tqdm bar with live success rate and latency p50; also forwards records to the logger."""

    def __init__(self, total: int, done: list[dict[str, Any]], enabled: bool, logger: Any, persist) -> None:
        self.records = list(done)
        self.logger = logger
        self.persist = persist
        self.bar = tqdm(total=total, initial=len(done), unit="ep", disable=not enabled, dynamic_ncols=True)
        self._refresh()

    def __call__(self, record: dict[str, Any]) -> None:
        self.persist(record)
        self.records.append(record)
        self.logger.log_episode(record)
        self.bar.update(1)
        self._refresh()

    def _refresh(self) -> None:
        finished = [r for r in self.records if r["status"] != "error"]
        wins = sum(r["success"] for r in finished)
        lat = latency_summary([x for r in self.records[-50:] for x in r.get("latency_ms", [])])
        self.bar.set_postfix(
            success=f"{wins}/{len(finished)}",
            errors=len(self.records) - len(finished),
            p50_ms=f"{lat['p50']:.1f}" if lat["n"] else "-",
        )

    def close(self) -> None:
        self.bar.close()


def evaluate(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Run one evaluation into `run_dir` (resuming what is there); returns the summary."""
    suite_cfg = suite_config(cfg.suite)
    runner_cfg = runner_config(cfg.runner)
    results = RunDir(run_dir)
    with results.hold():
        return _evaluate(cfg, suite_cfg, runner_cfg, results)


def _evaluate(cfg: DictConfig, suite_cfg: SuiteConfig, runner_cfg: RunnerConfig, results: RunDir) -> dict[str, Any]:
    gl = configure_rendering(runner_cfg.mujoco_gl)
    load_triton_before_gl()  # the policy runs in this process
    tasks = load_tasks(suite_cfg)
    episodes = episodes_of(tasks, suite_cfg)

    policy_cfg = OmegaConf.to_container(cfg.policy, resolve=True)
    fingerprint = {
        "policy": policy_cfg,
        "suites": list(suite_cfg.suites),
        "replan_steps": runner_cfg.replan_steps,
        "num_steps_wait": runner_cfg.num_steps_wait,
        "max_steps": runner_cfg.max_steps,
    }
    resumed = results.check_fingerprint(fingerprint)
    previous = results.latest_by_key()
    wanted = {e.key for e in episodes}
    keep = {
        k: r for k, r in previous.items() if k in wanted and not (runner_cfg.retry_errors and r["status"] == "error")
    }
    todo = [e for e in episodes if e.key not in keep]
    if resumed:
        log.info("resuming %s: %d of %d episodes already recorded", results.path, len(keep), len(episodes))

    logger = instantiate(cfg.logger, _convert_="all")  # a missing optional backend fails before the policy build
    policy, build_s = build_policy(cfg.policy)
    horizon = getattr(policy, "action_horizon", None)
    if horizon is not None and runner_cfg.replan_steps > horizon:  # openpi's client asserts this too
        raise ValueError(
            f"runner.replan_steps={runner_cfg.replan_steps} exceeds the {horizon} actions policy "
            f"{cfg.policy.name!r} predicts per call; use runner.replan_steps <= {horizon}"
        )
    for task in tasks:
        policy.check_task(task.info)
    warmup_s = policy.warmup()
    log.info("policy %s built in %.1fs, warm-up %.1fs", cfg.policy.name, build_s, warmup_s)

    sessions = results.read_manifest().get("sessions", [])
    manifest: dict[str, Any] = {
        **environment_info(),
        "mujoco_gl": gl,
        "fingerprint": fingerprint,
        "policy_name": cfg.policy.name,
        "suite_name": suite_cfg.name,
        "build_s": build_s,
        "warmup_s": warmup_s,
        "precision": getattr(policy, "precision_report", None),  # plan, kernels, fidelity ledger
        "sessions": sessions,
    }
    results.write_config(OmegaConf.to_yaml(cfg, resolve=True))

    session = {"episodes": 0, "wall_s": 0.0}
    manifest["sessions"] = [*sessions, session]
    results.write_manifest(manifest)  # the session is on record before its first episode can land
    t0 = time.perf_counter()

    def persist(record: dict[str, Any]) -> None:
        results.append(record)
        session.update(episodes=session["episodes"] + 1, wall_s=time.perf_counter() - t0)
        results.write_manifest(manifest)  # a killed run still accounts for the episodes it finished

    try:
        logger.log_config(OmegaConf.to_container(cfg, resolve=True), str(results.path))
        progress = Progress(len(episodes), list(keep.values()), runner_cfg.progress, logger, persist)
        interrupted: KeyboardInterrupt | None = None
        try:
            run(policy, todo, runner_cfg, progress, video_dir=str(results.videos), mujoco_gl=gl)
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: what finished is on record; the summary says it is partial
            interrupted = e
        finally:
            progress.close()
            session["wall_s"] = time.perf_counter() - t0
            results.write_manifest(manifest)
        summary = write_summary(results, wanted, manifest, cfg)
        logger.log_summary(summary)
    finally:
        logger.close()
    print(format_table(summary))
    print(f"results: {results.path}")
    if interrupted is not None:
        n = summary["episodes"]
        raise type(interrupted)(
            f"interrupted with {n} of {len(wanted)} episodes on record; the same command with "
            f"output_dir={results.path} resumes"
        )
    return summary


def write_summary(results: RunDir, wanted: set, manifest: Mapping[str, Any], cfg: DictConfig) -> dict[str, Any]:
    records = [r for k, r in sorted(results.latest_by_key().items()) if k in wanted]
    ran = [s for s in manifest["sessions"] if s["episodes"]]
    wall = sum(s["wall_s"] for s in ran)
    summary = summarize(records, wall_s=wall if ran else None)
    summary.update(
        policy=cfg.policy.name,
        suite=cfg.suite.name,
        complete=len(records) == len(wanted),
        expected_episodes=len(wanted),
        build_s=manifest["build_s"],
        warmup_s=manifest["warmup_s"],
    )
    if precision := manifest.get("precision"):
        summary.update(
            precision=precision["label"],
            simulated_precision=precision["simulated"],
            fidelity=precision.get("fidelity"),
        )
        if precision["simulated"]:
            summary["latency_note"] = "simulated precision (fake quantization): latency is not meaningful"
    results.write_summary(summary)
    return summary


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=cfg.get("log_level", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_command(lambda: evaluate(cfg, HydraConfig.get().runtime.output_dir))
