"""Success rates with Wilson 95% intervals and latency percentiles, computed from episode records."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when n == 0."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, center - half)  # exact at the edges: rounding put 10/10's bound a hair
    hi = 1.0 if successes == n else min(1.0, center + half)  # below 1, a negative error bar on the report's plot
    return (lo, hi)


def latency_summary(samples_ms: Sequence[float]) -> dict[str, float | int]:
    """p50/p90/p99/mean/max/min and n of a list of per-call latencies in milliseconds."""
    if len(samples_ms) == 0:
        return {"n": 0}
    a = np.asarray(samples_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {
        "n": int(a.size),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "mean": float(a.mean()),
        "max": float(a.max()),
        "min": float(a.min()),
    }


def success_block(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Successes over finished (non-error) episodes, with the Wilson CI; errors counted apart."""
    finished = [r for r in records if r["status"] != "error"]
    k = sum(1 for r in finished if r["success"])
    n = len(finished)
    lo, hi = wilson_interval(k, n)
    return {
        "successes": k,
        "n": n,
        "rate": k / n if n else None,
        "ci95": [lo, hi],
        "errors": len(records) - n,
    }


def stage_summaries(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float | int]]:
    stages: dict[str, list[float]] = defaultdict(list)
    for r in records:
        for name, values in (r.get("stage_ms") or {}).items():
            stages[name].extend(values)
    return {name: latency_summary(v) for name, v in sorted(stages.items())}


def summarize(records: Sequence[Mapping[str, Any]], wall_s: float | None = None) -> dict[str, Any]:
    """The `summary.json` block: overall, per suite and per task success; latency; throughput."""
    by_suite: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    by_task: dict[tuple[str, int], list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        by_suite[r["suite"]].append(r)
        by_task[(r["suite"], r["task_id"])].append(r)
    latencies = [x for r in records for x in r.get("latency_ms", [])]
    sim_steps = sum(r.get("steps", 0) for r in records)
    sim_s = sum(r.get("sim_s", 0.0) for r in records)
    episode_wall = sum(r.get("wall_s", 0.0) for r in records)
    summary: dict[str, Any] = {
        "episodes": len(records),
        "success": success_block(records),
        "suites": {s: success_block(rs) for s, rs in sorted(by_suite.items())},
        "tasks": [
            {"suite": s, "task_id": t, "task": rs[0]["task"], **success_block(rs)}
            for (s, t), rs in sorted(by_task.items())
        ],
        "latency_ms": latency_summary(latencies),
        "stage_ms": stage_summaries(records),
        "sim_steps": sim_steps,
        "sim_steps_per_s": sim_steps / sim_s if sim_s > 0 else None,
        "episode_wall_s_total": episode_wall,
    }
    if wall_s is not None:
        summary["wall_s"] = wall_s
        summary["episodes_per_hour"] = 3600.0 * len(records) / wall_s if wall_s > 0 else None
    return summary


def format_table(summary: Mapping[str, Any]) -> str:
    """A plain-text table of per-task and per-suite success plus latency, for the end of a run."""
    rows = [("suite", "task", "success", "rate", "95% CI", "errors")]
    for t in summary["tasks"]:
        rows.append(_row(t["suite"], str(t["task_id"]), t))
    for s, block in summary["suites"].items():
        rows.append(_row(s, "all", block))
    if len(summary["suites"]) > 1:
        rows.append(_row("total", "all", summary["success"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lat = summary["latency_ms"]
    if lat.get("n"):
        lines.append(
            f"policy call latency (ms, n={lat['n']}): p50 {lat['p50']:.2f}  p90 {lat['p90']:.2f}  "
            f"p99 {lat['p99']:.2f}  mean {lat['mean']:.2f}  max {lat['max']:.2f}"
        )
    if summary.get("simulated_precision"):
        lines.append("latency: NOT MEANINGFUL — the precision plan was simulated with fake quantization")
    if fid := (summary.get("fidelity") or {}).get("plan"):
        lines.append(
            f"fidelity vs {summary['fidelity'].get('reference', 'reference')} (n={fid['n']} held-out): cosine "
            f"{fid['cosine']:.5f}  max|Δ| {fid['max_abs']:.4g}  nMSE {fid['nmse']:.3g}"
        )
    if summary.get("episodes_per_hour"):
        lines.append(
            f"wall {summary['wall_s']:.1f}s  episodes/hour {summary['episodes_per_hour']:.1f}  "
            f"sim steps/s {summary['sim_steps_per_s'] or 0:.1f}"
        )
    return "\n".join(lines)


def _row(suite: str, task: str, block: Mapping[str, Any]) -> tuple[str, ...]:
    rate = "-" if block["rate"] is None else f"{100 * block['rate']:.1f}%"
    lo, hi = block["ci95"]
    return (
        suite,
        task,
        f"{block['successes']}/{block['n']}",
        rate,
        f"[{100 * lo:.1f}, {100 * hi:.1f}]",
        str(block["errors"]),
    )
