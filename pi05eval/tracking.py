"""Experiment loggers: a small protocol (`log_config`, `log_episode`, `log_summary`, `close`) and its backends.

Results on disk (`episodes.jsonl`, `summary.json`) are the source of truth; loggers mirror them elsewhere.
`WandbLogger` (`logger=wandb`) makes one W&B run per job; the jobs of one multirun share a group. W&B is imported
only when that logger is built, and a W&B server that cannot be reached never stops an evaluation: the run falls
back to offline mode (sync it later with `wandb sync`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from pi05eval.metrics import latency_summary
from pi05eval.results import MANIFEST, RunDir

log = logging.getLogger(__name__)

WANDB_INSTALL_HINT = 'pip install "pi05eval[wandb]"'
STATUS_ORDER = {"error": 0, "failure": 1, "success": 2}  # videos of failures first


class Logger(Protocol):
    def log_config(self, config: Mapping[str, Any], run_dir: str) -> None: ...

    def log_episode(self, record: Mapping[str, Any]) -> None: ...

    def log_summary(self, summary: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class LocalLogger:
    """Keeps results in the run directory only."""

    def log_config(self, config: Mapping[str, Any], run_dir: str) -> None:
        log.info("results in %s", run_dir)

    def log_episode(self, record: Mapping[str, Any]) -> None:
        log.debug("episode %s/%s trial %s: %s", record["suite"], record["task_id"], record["trial"], record["status"])

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


# ---- W&B helpers (also used by `python -m pi05eval.report --wandb`) ----------------------------------------------
def import_wandb() -> Any:
    """The `wandb` module, or an ImportError that says which extra to install."""
    try:
        import wandb
    except ImportError as e:
        raise ImportError(f"logger=wandb needs the wandb package, which is not installed: {WANDB_INSTALL_HINT}") from e
    return wandb


def init_wandb_run(
    wandb: Any, *, mode: str | None, init_timeout: float, finish_timeout: float, **init_kwargs: Any
) -> Any | None:
    """`wandb.init`; if an online run cannot start (server unreachable, not logged in) retry offline.

    Returns None (with an error logged) only if W&B cannot run even offline: the evaluation goes on regardless.
    """
    settings = _wandb_settings(wandb, init_timeout=init_timeout, finish_timeout=finish_timeout)
    mode = mode or os.environ.get("WANDB_MODE") or "online"
    try:
        return wandb.init(mode=mode, settings=settings, **init_kwargs)
    except Exception as e:  # wandb raises CommError, UsageError, TimeoutError, ... depending on the failure
        if mode in ("offline", "disabled"):
            log.error("W&B run could not start in %s mode (%s); continuing without W&B", mode, e)
            return None
        log.warning("W&B run could not start online (%s: %s); logging offline instead", type(e).__name__, e)
    try:
        run = wandb.init(mode="offline", settings=settings, **init_kwargs)
    except Exception as e:
        log.error("W&B run could not start offline either (%s); continuing without W&B", e)
        return None
    log.warning("W&B run is offline: upload it later with `wandb sync %s`", Path(run.dir).parent)
    return run


def _wandb_settings(wandb: Any, **values: float) -> Any:
    known = getattr(wandb.Settings, "model_fields", None)  # older wandb versions lack some settings
    return wandb.Settings(**{k: v for k, v in values.items() if known is None or k in known})


def multirun_info() -> dict[str, Any]:
    """Hydra job info of a multirun job (sweep dir, job number, overrides); empty for a single run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return {}
    return {"sweep_dir": str(hc.sweep.dir), "job_num": int(hc.job.num), "overrides": list(hc.overrides.task)}


def run_name(config: Mapping[str, Any]) -> str:
    """`<policy>-<suite>[-<n>steps]`, e.g. `compile_bf16-libero_spatial-10steps`."""
    policy = config.get("policy") or {}
    suite = config.get("suite") or {}
    parts = [str(policy.get("name", "policy")), str(suite.get("name", "suite"))]
    if policy.get("num_steps") is not None:
        parts.append(f"{policy['num_steps']}steps")
    return "-".join(parts)


def summary_metrics(summary: Mapping[str, Any]) -> dict[str, Any]:
    """`summary.json` flattened to W&B summary keys: success ± CI (overall, per suite, per task), latency, cost."""
    out: dict[str, Any] = {}
    _success(out, "success", summary["success"])
    for suite, block in summary.get("suites", {}).items():
        _success(out, f"success/{suite}", block)
    for t in summary.get("tasks", []):
        _success(out, f"task/{t['suite']}/{t['task_id']:02d}", t)
    _latency(out, "latency_ms", summary.get("latency_ms") or {})
    for stage, lat in (summary.get("stage_ms") or {}).items():
        _latency(out, f"stage_ms/{stage}", lat)
    _flatten_numbers(out, "fidelity", summary.get("fidelity"))
    for key in ("build_s", "warmup_s", "wall_s", "episodes_per_hour", "sim_steps_per_s", "episodes"):
        if summary.get(key) is not None:
            out[key] = summary[key]
    for key in ("complete", "expected_episodes"):
        if key in summary:
            out[key] = summary[key]
    return out


def _success(out: dict[str, Any], prefix: str, block: Mapping[str, Any]) -> None:
    if block.get("rate") is not None:
        out[f"{prefix}/rate"] = block["rate"]
    out[f"{prefix}/ci95_low"], out[f"{prefix}/ci95_high"] = block["ci95"]
    out[f"{prefix}/n"] = block["n"]
    out[f"{prefix}/errors"] = block["errors"]


def _latency(out: dict[str, Any], prefix: str, lat: Mapping[str, Any]) -> None:
    for key in ("p50", "p90", "p99", "mean", "max", "n"):
        if key in lat:
            out[f"{prefix}/{key}"] = lat[key]


def _flatten_numbers(out: dict[str, Any], prefix: str, value: Any) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten_numbers(out, f"{prefix}/{k}", v)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        out[prefix] = value


def failures_first(records: Sequence[Mapping[str, Any]], limit: int) -> list[Mapping[str, Any]]:
    """Records with a video, errors and failures before successes, at most `limit`."""
    with_video = [r for r in records if r.get("video")]
    with_video.sort(key=lambda r: (STATUS_ORDER.get(r["status"], 3), r["suite"], r["task_id"], r["trial"]))
    return with_video[: max(0, limit)]


# ---- the W&B logger ----------------------------------------------------------------------------------------------
class WandbLogger:
    """One W&B run per evaluation job (`conf/logger/wandb.yaml` documents every argument)."""

    def __init__(
        self,
        project: str = "pi05eval",
        entity: str | None = None,
        group: str | None = None,
        tags: Sequence[str] = (),
        mode: str | None = None,
        name: str | None = None,
        job_type: str = "eval",
        dir: str | None = None,
        init_timeout: float = 30.0,
        finish_timeout: float = 300.0,
        max_videos: int = 8,
        log_episodes: bool = True,
    ) -> None:
        self.wandb = import_wandb()  # fails here, when the logger is built, not after the evaluation
        if mode not in (None, "online", "offline", "disabled"):
            raise ValueError(f"logger.mode must be online, offline, disabled or null, got {mode!r}")
        self.project, self.entity, self.group, self.tags = project, entity, group, list(tags)
        self.mode, self.name, self.job_type, self.dir = mode, name, job_type, dir
        self.init_timeout, self.finish_timeout = init_timeout, finish_timeout
        self.max_videos, self.log_episodes = max_videos, log_episodes
        self.run: Any | None = None
        self.run_dir: Path | None = None
        self.episodes = 0
        self.successes = 0

    def log_config(self, config: Mapping[str, Any], run_dir: str) -> None:
        self.run_dir = Path(run_dir)
        job = multirun_info()
        group = self.group or (Path(job["sweep_dir"]).name if job else None)
        wandb_dir = self.dir or (None if os.environ.get("WANDB_DIR") else str(self.run_dir))
        self.run = init_wandb_run(
            self.wandb,
            mode=self.mode,
            init_timeout=self.init_timeout,
            finish_timeout=self.finish_timeout,
            project=self.project,
            entity=self.entity,
            group=group,
            tags=self.tags,
            name=self.name or run_name(config),
            job_type=self.job_type,
            dir=wandb_dir,
            config={**config, "run_dir": str(self.run_dir.resolve()), "hydra_job": job},
        )
        if self.run is not None:
            self.run.define_metric("episode/index")
            self.run.define_metric("episode/*", step_metric="episode/index")
            log.info("W&B run %s (group %s) in %s", self.run.name, group, self.run.dir)

    def log_episode(self, record: Mapping[str, Any]) -> None:
        if self.run is None or not self.log_episodes:
            return
        self.episodes += 1
        self.successes += int(bool(record["success"]))
        row = {
            "episode/index": self.episodes,
            "episode/task_id": record["task_id"],
            "episode/trial": record["trial"],
            "episode/success": int(bool(record["success"])),
            "episode/error": int(record["status"] == "error"),
            "episode/steps": record.get("steps", 0),
            "episode/success_rate_so_far": self.successes / self.episodes,
        }
        p50 = (record.get("latency") or {}).get("p50")
        if p50 is not None:
            row["episode/latency_p50_ms"] = p50
        self._guard("log an episode", self.run.log, row)

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        if self.run is not None:
            self._guard("log the summary", self._log_summary, summary)

    def close(self) -> None:
        run, self.run = self.run, None
        if run is not None:
            self._guard("finish the run", run.finish)

    # ---- internals -----------------------------------------------------------------------------------------------
    def _guard(self, what: str, fn: Any, *args: Any) -> None:
        """W&B trouble is logged, never raised: the results on disk are what counts."""
        try:
            fn(*args)
        except Exception:
            log.exception("W&B: could not %s", what)

    def _log_summary(self, summary: Mapping[str, Any]) -> None:
        wandb, run = self.wandb, self.run
        run.summary.update(summary_metrics(summary))
        records = self._records(summary)
        manifest = _read_json(self.run_dir / MANIFEST) if self.run_dir else {}
        env_keys = ("versions", "gpu", "gpu_capability", "cuda", "git_commit", "host", "mujoco_gl")
        run.config.update({"environment": {k: manifest.get(k) for k in env_keys}}, allow_val_change=True)
        media: dict[str, Any] = {"tasks": task_table(wandb, summary, records)}
        latencies = [x for r in records for x in r.get("latency_ms", [])]
        if latencies:
            media["latency_ms/histogram"] = wandb.Histogram(latencies, num_bins=64)
        for r in failures_first(records, self.max_videos):
            path = self._video_path(r["video"])
            if path is not None:
                key = f"video/{r['suite']}_task{r['task_id']:02d}_trial{r['trial']:02d}_{r['status']}"
                media[key] = wandb.Video(str(path), caption=f"{r['language']} ({r['status']})")
        run.log(media)

    def _records(self, summary: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The run's latest record per episode (resumed ones included), restricted to the summary's tasks."""
        if self.run_dir is None:
            return []
        tasks = {(t["suite"], t["task_id"]) for t in summary.get("tasks", [])}
        latest = RunDir(self.run_dir).latest_by_key()
        return [r for k, r in sorted(latest.items()) if k[:2] in tasks]

    def _video_path(self, video: str) -> Path | None:
        path = Path(video)
        if not path.is_absolute() and not path.exists() and self.run_dir is not None:
            path = self.run_dir / path
        return path if path.exists() else None


def task_table(wandb: Any, summary: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> Any:
    """A `wandb.Table` with one row per task: success ± CI, errors and latency p50."""
    columns = ["suite", "task_id", "task", "successes", "n", "rate", "ci95_low", "ci95_high", "errors", "p50_ms"]
    rows = []
    for t in summary.get("tasks", []):
        lat = [x for r in records if (r["suite"], r["task_id"]) == (t["suite"], t["task_id"]) for x in r["latency_ms"]]
        p50 = latency_summary(lat).get("p50")
        lo, hi = t["ci95"]
        rows.append([t["suite"], t["task_id"], t["task"], t["successes"], t["n"], t["rate"], lo, hi, t["errors"], p50])
    return wandb.Table(columns=columns, data=rows)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
