"""Compare evaluation runs: `python -m pi05eval.report RUN_OR_SWEEP_DIR... [--out DIR] [--wandb]`.

Finds every run dir (a folder holding `manifest.json`) under the given paths and recomputes each number from its
`episodes.jsonl`, so a sweep still running or killed half-way is reported too, its incomplete runs flagged
(`summary.json` is not needed). Writes `report.md` (one table row per run), `report.json`, `pareto.png` (success vs
latency p50) and `latency.png` (per-call latency distributions) into the sweep dir or `--out`; files are only read
in the run dirs themselves.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from pi05eval.errors import run_command
from pi05eval.metrics import latency_summary, success_block
from pi05eval.results import CONFIG, EPISODES, MANIFEST, SUMMARY

log = logging.getLogger(__name__)

# Tasks per LIBERO suite (LIBERO's benchmark: spatial/object/goal/10 ship 10 tasks each, libero_90 ships 90).
TASKS_PER_SUITE = {"libero_spatial": 10, "libero_object": 10, "libero_goal": 10, "libero_10": 10, "libero_90": 90}
# config keys never shown in plot labels: bookkeeping, or visible elsewhere (episode counts are in the table)
LABEL_SKIP = ("output_dir", "log_level", "logger.", "policy.name", "policy._target_", "suite.tasks", "suite.suites",
              "suite.trials_per_task", "suite.first_trial", "runner.progress", "runner.video", "runner.num_envs",
              "runner.retry_errors", "runner.mujoco_gl", "runner.fault")  # fmt: skip


@dataclass(frozen=True)
class RunResult:
    """One run dir, every number recomputed from its episode records."""

    name: str  # path relative to the searched root, e.g. "3_compile_bf16_libero_spatial"
    path: str
    policy: str
    engine: str | None
    precision: str | None  # "bf16" or "vision=bf16,expert=fp8" for a per-component mix
    num_steps: int | None
    suites: dict[str, dict[str, Any]]  # suite -> success block (successes, n, rate, ci95, errors)
    success: dict[str, Any]  # all suites together
    latency: dict[str, Any]  # p50/p90/p99/mean/max/min and n of every policy call, in ms
    latency_ms: list[float]  # raw per-call samples
    fidelity: str | None  # e.g. "action_mse=0.0012, cosine=0.998", when the run reports it
    episodes: int  # recorded (latest record of each episode)
    expected: int | None  # episodes the run's config asks for
    complete: bool
    build_s: float | None
    label: str = ""  # short name on the plots: policy plus the config values that vary across runs

    @property
    def errors(self) -> int:
        return self.success["errors"]

    @property
    def hz(self) -> float | None:
        p50 = self.latency.get("p50")
        return 1000.0 / p50 if p50 else None


# ---- reading run dirs ----------------------------------------------------------------------------------------------
def find_run_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """Every dir holding a `manifest.json` at or below the given paths (W&B's own folders skipped)."""
    found: set[Path] = set()
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"no such run or sweep dir: {p}")
        candidates = [p / MANIFEST] if (p / MANIFEST).exists() else p.rglob(MANIFEST)
        found.update(m.parent.resolve() for m in candidates if "wandb" not in m.relative_to(p).parts[:-1])
    return sorted(found)


def read_records(path: Path) -> list[dict[str, Any]]:
    """Complete lines of an `episodes.jsonl`, read-only (a line still being written is skipped, never cut)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            if line.endswith("\n"):
                records.append(json.loads(line))
        except ValueError:
            log.warning("skipping an unreadable line in %s", path)
    return records


def wanted_episodes(config: Mapping[str, Any]) -> set[tuple[str, int, int]] | None:
    """(suite, task_id, trial) of every episode the run's `config.yaml` asks for; None if it cannot tell."""
    suite = config.get("suite") or {}
    if not suite.get("suites") or not suite.get("trials_per_task"):
        return None
    first = int(suite.get("first_trial") or 0)
    trials = range(first, first + int(suite["trials_per_task"]))
    out = set()
    for s in suite["suites"]:
        tasks = suite.get("tasks")
        if tasks is None and s not in TASKS_PER_SUITE:
            return None
        for t in range(TASKS_PER_SUITE[s]) if tasks is None else tasks:
            out.update((s, int(t), k) for k in trials)
    return out


def load_run(path: Path, root: Path) -> RunResult:
    config = _load_yaml(path / CONFIG)
    manifest = _load_json(path / MANIFEST)
    summary = _load_json(path / SUMMARY)
    latest = {(r["suite"], r["task_id"], r["trial"]): r for r in read_records(path / EPISODES)}
    wanted = wanted_episodes(config)
    records = [r for k, r in sorted(latest.items()) if wanted is None or k in wanted]
    expected = len(wanted) if wanted is not None else summary.get("expected_episodes")
    by_suite: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_suite.setdefault(r["suite"], []).append(r)
    policy = config.get("policy") or {}
    samples = [float(x) for r in records for x in r.get("latency_ms", [])]
    return RunResult(
        name=str(path.relative_to(root)) if path != root and path.is_relative_to(root) else path.name,
        path=str(path),
        policy=str(policy.get("name") or manifest.get("policy_name") or "?"),
        engine=policy.get("engine"),
        precision=_precision_text(policy.get("precision")),
        num_steps=policy.get("num_steps"),
        suites={s: success_block(rs) for s, rs in sorted(by_suite.items())},
        success=success_block(records),
        latency=latency_summary(samples),
        latency_ms=samples,
        fidelity=_fidelity_text(
            summary.get("fidelity") or manifest.get("fidelity") or _load_json(path / "fidelity.json")
        ),
        episodes=len(records),
        expected=expected,
        complete=expected is not None and len(records) >= expected,
        build_s=manifest.get("build_s"),
    )


def load_runs(paths: Sequence[str | Path]) -> list[RunResult]:
    """Every run under `paths`, labelled and sorted by policy, denoise steps and name."""
    dirs = find_run_dirs(paths)
    roots = [Path(p).resolve() for p in paths]
    runs = []
    for d in dirs:
        root = next((r for r in roots if d.is_relative_to(r)), d.parent)
        runs.append(load_run(d, root.parent if len(roots) > 1 else root))  # several sweeps: name keeps the sweep
    labels = make_labels([_load_yaml(Path(r.path) / CONFIG) for r in runs], [r.policy for r in runs])
    runs = [RunResult(**{**asdict(r), "label": label}) for r, label in zip(runs, labels, strict=True)]
    return sorted(runs, key=lambda r: (r.policy, r.num_steps or 0, r.name))


def make_labels(configs: Sequence[Mapping[str, Any]], policies: Sequence[str]) -> list[str]:
    """`policy key=value ...` with only the config values that differ between runs (e.g. `eager_bf16 steps=5`)."""
    flat = [_flatten(c) for c in configs]
    keys = sorted({k for f in flat for k in f})
    varying = [k for k in keys if not k.startswith(LABEL_SKIP) and len({json.dumps(f.get(k)) for f in flat}) > 1]
    labels = []
    for f, policy in zip(flat, policies, strict=True):
        parts = [policy]
        for k in varying:
            if f.get(k) is None or (k.startswith("policy.") and k != "policy.num_steps"):
                continue  # other policy keys differ because the policy does: its name says it
            parts.append(f"{k.rsplit('.', 1)[-1].replace('num_steps', 'steps')}={f[k]}")
        labels.append(" ".join(parts))
    # runs that still share a label (e.g. repeated runs) get their index
    return [f"{lab} #{i}" if labels.count(lab) > 1 else lab for i, lab in enumerate(labels)]


# ---- the table ----------------------------------------------------------------------------------------------------
def markdown_table(runs: Sequence[RunResult]) -> str:
    """One row per run: policy, engine, precision, steps, success ± 95% CI per suite, latency, Hz, fidelity, ..."""
    suites = sorted({s for r in runs for s in r.suites})
    overall = len(suites) > 1
    head = ["run", "policy", "engine", "precision", "steps", *suites, *(["all"] if overall else [])]
    head += ["p50 ms", "p99 ms", "Hz", "fidelity", "errors", "complete"]
    rows = []
    for r in runs:
        cells = [
            r.name,
            r.policy,
            r.engine or "-",
            r.precision or "-",
            "-" if r.num_steps is None else str(r.num_steps),
        ]
        cells += [_success_text(r.suites.get(s)) for s in suites]
        if overall:
            cells.append(_success_text(r.success))
        cells += [_ms(r.latency.get("p50")), _ms(r.latency.get("p99")), f"{r.hz:.1f}" if r.hz else "-"]
        cells += [r.fidelity or "-", str(r.errors), "yes" if r.complete else f"no ({r.episodes}/{r.expected or '?'})"]
        rows.append(cells)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def report_markdown(runs: Sequence[RunResult], images: Sequence[str]) -> str:
    incomplete = [r.name for r in runs if not r.complete]
    parts = [
        f"# pi05eval report: {len(runs)} run(s)",
        "",
        markdown_table(runs),
        "",
        "Success: rate over finished episodes with its Wilson 95% interval and (successes/n); errors are counted "
        "apart. Latency: one policy call, host observation in to host actions out (GPU synchronized), over every "
        "call of the run; Hz = 1000 / p50 (policy calls per second).",
    ]
    if incomplete:
        parts += ["", f"**Incomplete runs** (numbers cover the episodes recorded so far): {', '.join(incomplete)}"]
    parts += ["", *(f"![{Path(p).stem}]({Path(p).name})" for p in images)]
    return "\n".join(parts) + "\n"


def _success_text(block: Mapping[str, Any] | None) -> str:
    if not block or block.get("rate") is None:
        return "-"
    lo, hi = block["ci95"]
    return f"{100 * block['rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] ({block['successes']}/{block['n']})"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value < 1 else f"{value:.1f}"


def _precision_text(precision: Any) -> str | None:
    """A run's precision plan as its short label (`bf16`, `bf16+prefix.mlp=fp8`, `+sim`), not its whole mapping."""
    if isinstance(precision, Mapping):
        from pi05eval.precision.plan import PrecisionPlan

        try:
            return PrecisionPlan.parse(precision).label
        except (TypeError, ValueError):  # a plan of another version (PrecisionError is a ValueError): its items
            return ",".join(f"{k}={v}" for k, v in precision.items())
    return None if precision is None else str(precision)


def _fidelity_text(fidelity: Any) -> str | None:
    if not fidelity:
        return None
    if not isinstance(fidelity, Mapping):
        return str(fidelity)
    numbers = {k: v for k, v in _flatten(fidelity).items() if isinstance(v, int | float) and not isinstance(v, bool)}
    return ", ".join(f"{k}={v:.3g}" for k, v in list(numbers.items())[:3]) or None


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _load_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# ---- entry point ---------------------------------------------------------------------------------------------------
def write_report(paths: Sequence[str | Path], out: str | Path) -> tuple[list[RunResult], list[Path]]:
    """Write report.md, report.json and the plots into `out`; returns the runs and the files written."""
    from pi05eval.plots import latency_plot, pareto_plot

    runs = load_runs(paths)
    if not runs:
        raise FileNotFoundError(f"no run dirs (folders with {MANIFEST}) under {[str(p) for p in paths]}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = [pareto_plot(runs, out / "pareto.png"), latency_plot(runs, out / "latency.png")]
    images = [p for p in images if p is not None]
    (out / "report.md").write_text(report_markdown(runs, [str(p) for p in images]))
    rows = [{k: v for k, v in asdict(r).items() if k != "latency_ms"} | {"hz": r.hz, "errors": r.errors} for r in runs]
    (out / "report.json").write_text(json.dumps(rows, indent=2))
    return runs, [out / "report.md", out / "report.json", *images]


def log_report_to_wandb(runs: Sequence[RunResult], files: Sequence[Path], args: argparse.Namespace) -> None:
    """One W&B run (job_type=report) in the sweep's group: the table, the plots and report.md."""
    from pi05eval.tracking import import_wandb, init_wandb_run

    wandb = import_wandb()
    out = files[0].parent
    run = init_wandb_run(
        wandb, mode=args.wandb_mode, init_timeout=30, finish_timeout=300, project=args.project,
        entity=args.entity, group=args.group or out.name, name=f"report-{out.name}", job_type="report",
        dir=str(out), config={"runs": [r.path for r in runs]},
    )  # fmt: skip
    if run is None:
        return
    try:
        columns = ["run", "label", "policy", "engine", "precision", "steps", "success", "ci95_low", "ci95_high"]
        columns += ["p50_ms", "p99_ms", "hz", "errors", "complete"]
        data = [
            [r.name, r.label, r.policy, r.engine, r.precision, r.num_steps, r.success["rate"], *r.success["ci95"],
             r.latency.get("p50"), r.latency.get("p99"), r.hz, r.errors, r.complete]
            for r in runs
        ]  # fmt: skip
        media: dict[str, Any] = {"report/runs": wandb.Table(columns=columns, data=data)}
        media.update({f"report/{f.stem}": wandb.Image(str(f)) for f in files if f.suffix == ".png"})
        run.log(media)
        run.save(str(out / "report.md"), base_path=str(out), policy="now")
    finally:
        run.finish()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pi05eval.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="run dirs or sweep dirs (searched recursively for manifest.json)")
    parser.add_argument("--out", help="where to write the report; default: the single path given")
    parser.add_argument("--wandb", action="store_true", help="also log the table and plots to W&B")
    parser.add_argument("--project", default="pi05eval", help="W&B project (with --wandb)")
    parser.add_argument("--entity", default=None, help="W&B entity (with --wandb)")
    parser.add_argument("--group", default=None, help="W&B group (with --wandb); default: the output dir's name")
    parser.add_argument("--wandb-mode", default=None, choices=["online", "offline", "disabled"])
    args = parser.parse_args(argv)
    if args.out is None and len(args.paths) > 1:
        parser.error("several paths given: say where the report goes with --out DIR")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    runs, files = write_report(args.paths, args.out or args.paths[0])
    print(markdown_table(runs))
    incomplete = [r.name for r in runs if not r.complete]
    if incomplete:
        print(f"\nincomplete runs: {', '.join(incomplete)}")
    print("\nwrote " + ", ".join(str(f) for f in files))
    if args.wandb:
        log_report_to_wandb(runs, files, args)


if __name__ == "__main__":
    run_command(main, FileNotFoundError)
