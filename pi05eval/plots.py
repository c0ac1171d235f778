"""The report's figures, drawn with matplotlib's Agg canvas (no display, no pyplot state).

- `pareto_plot`: success rate vs per-call latency p50, Wilson 95% error bars, the Pareto frontier highlighted
  (runs no other run beats on both success and latency), one labelled point per run.
- `latency_plot`: each run's per-call latency distribution as an ECDF on a log axis, p50 and p99 marked.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pi05eval.report import RunResult

log = logging.getLogger(__name__)

MATPLOTLIB_HINT = 'the report\'s plots need matplotlib: pip install "pi05eval[report]"'


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(MATPLOTLIB_HINT) from e
    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself: text sizes can be measured before saving
    return fig


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _log_ms_axis(ax: Any) -> None:
    """Log x axis ticked at 1, 2, 3, 5 x 10^k and labelled in plain milliseconds."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    lo, hi = ax.get_xlim()
    subs = (1.0, 2.0, 3.0, 5.0) if hi / lo < 30 else (1.0, 3.0) if hi / lo < 1e3 else (1.0,)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _latency_axis(ax: Any, x: np.ndarray) -> None:
    """Log scale when latencies span more than 10x; room on the right for the point labels."""
    lo, hi = float(x.min()), float(x.max())
    if lo > 0 and hi / lo > 10:
        ax.set_xlim(lo / 1.5, hi * 3.0)
        _log_ms_axis(ax)
    else:
        pad = (hi - lo) * 0.1 or hi * 0.1 or 1.0
        ax.set_xlim(max(0.0, lo - pad), hi + 3 * pad)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (latency, success) points no other point beats: lower-or-equal latency and higher success,
    or equal success at lower latency. Sorted by latency."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -np.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def pareto_plot(runs: Sequence[RunResult], path: Path) -> Path | None:
    """Success (%) vs latency p50 (ms) with CI error bars; the frontier drawn as a step line."""
    plotted = [r for r in runs if r.latency.get("n") and r.success.get("rate") is not None]
    if not plotted:
        log.warning("no run has both finished episodes and latency samples: no Pareto plot")
        return None
    x = np.array([r.latency["p50"] for r in plotted])  # [R] ms
    y = np.array([100 * r.success["rate"] for r in plotted])  # [R] %
    ci = np.array([[100 * r.success["rate"] - 100 * r.success["ci95"][0] for r in plotted],
                   [100 * r.success["ci95"][1] - 100 * r.success["rate"] for r in plotted]])  # [2, R]  # fmt: skip
    ci = ci.clip(min=0.0)  # older summaries hold bounds a rounding error inside 0 % and 100 %
    front = pareto_front(list(zip(x.tolist(), y.tolist(), strict=True)))
    fig = _figure(8.0, 5.5)
    ax = fig.add_subplot()
    colors = _colors(len(plotted))
    if len(front) > 1:
        ax.plot(x[front], y[front], drawstyle="steps-post", color="tab:red", lw=1.5, alpha=0.6, zorder=1,
                label="Pareto frontier")  # fmt: skip
    for i, r in enumerate(plotted):
        on_front = i in front
        ax.errorbar(x[i], y[i], yerr=ci[:, i : i + 1], fmt="o" if r.complete else "s", ms=9 if on_front else 6,
                    color=colors[i], mfc=colors[i] if r.complete else "white", mec="tab:red" if on_front else colors[i],
                    mew=2 if on_front else 1, capsize=3, zorder=3)  # fmt: skip
    _latency_axis(ax, x)
    ax.set_ylim(-5, 105)
    ax.set_xlabel("policy call latency p50 (ms)  →  slower")
    ax.set_ylabel("success rate (%), Wilson 95% CI")
    ax.set_title("Success vs latency (frontier: red outline, bold label; hollow squares: incomplete runs)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if len(front) > 1:
        ax.legend(loc="lower right", fontsize=8)
    labels = [r.label + ("" if r.complete else f" (partial {r.episodes}/{r.expected or '?'})") for r in plotted]
    _label_points(fig, ax, x, y, labels, colors, [i in front for i in range(len(plotted))])
    fig.savefig(path)
    return path


def _label_points(
    fig: Any, ax: Any, x: np.ndarray, y: np.ndarray, labels: list[str], colors: list[Any], bold: list[bool]
) -> None:
    """One label per point, moved up or down (leader line) until it stays in the axes and overlaps no earlier label."""
    fig.draw_without_rendering()  # settle the layout so data -> pixel transforms are final
    fig.set_layout_engine("none")
    renderer = fig.canvas.get_renderer()
    axes_box = ax.get_window_extent(renderer)
    placed: list[Any] = []  # pixel boxes of the labels placed so far
    for i in np.argsort(x, kind="stable"):
        weight = "bold" if bold[i] else "normal"
        style = {"textcoords": "offset points", "fontsize": 8, "va": "center", "color": colors[i], "fontweight": weight}
        for step in range(40):
            dy = 4 + 11 * ((step + 1) // 2) * (1 if step % 2 == 0 else -1)  # 4, -7, 15, -18, 26, ...
            text = ax.annotate(labels[i], (x[i], y[i]), xytext=(6, dy), **style)
            box = text.get_window_extent(renderer)
            if box.x1 > axes_box.x1:  # would leave the axes on the right: put it on the left of the point
                text.set_horizontalalignment("right")
                text.xyann = (-6, dy)
                box = text.get_window_extent(renderer)
            inside = axes_box.y0 <= box.y0 and box.y1 <= axes_box.y1
            if (inside and not any(box.overlaps(b) for b in placed)) or step == 39:
                placed.append(box)
                if abs(dy) > 12:  # far from its point: redraw with a leader line (measured without it)
                    ha, xy_text = text.get_horizontalalignment(), text.xyann
                    text.remove()
                    leader = {"arrowstyle": "-", "color": "gray", "lw": 0.5}
                    ax.annotate(labels[i], (x[i], y[i]), xytext=xy_text, ha=ha, arrowprops=leader, **style)
                break
            text.remove()


def latency_plot(runs: Sequence[RunResult], path: Path) -> Path | None:
    """ECDF of every run's per-call latencies on a log axis; dots at p50 and p99."""
    plotted = [r for r in runs if r.latency_ms]
    if not plotted:
        log.warning("no run has latency samples: no latency plot")
        return None
    fig = _figure(8.0, 4.8 + 0.2 * ((len(plotted) + 1) // 2))  # taller for the legend rows under the axes
    ax = fig.add_subplot()
    for r, color in zip(plotted, _colors(len(plotted)), strict=True):
        samples = np.sort(np.asarray(r.latency_ms, dtype=np.float64))  # [N] ms
        ecdf = np.arange(samples.size + 1) / samples.size  # [N + 1], from 0 at the fastest call
        label = f"{r.label}  p50 {r.latency['p50']:.3g} / p99 {r.latency['p99']:.3g} ms (n={samples.size})"
        ax.step(np.r_[samples[0], samples], ecdf, where="post", color=color, lw=1.5, label=label)
        ax.plot([r.latency["p50"], r.latency["p99"]], [0.5, 0.99], "o", color=color, ms=5)
    _log_ms_axis(ax)
    ax.set_ylim(0, 1.02)
    ax.axhline(0.5, color="gray", lw=0.6, ls=":")
    ax.axhline(0.99, color="gray", lw=0.6, ls=":")
    ax.set_xlabel("policy call latency (ms, log scale): host observation in → actions out")
    ax.set_ylabel("fraction of calls ≤ latency")
    ax.set_title("Per-call latency distribution (ECDF; dots: p50 and p99)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.legend(loc="outside lower center", ncol=2 if len(plotted) > 1 else 1, fontsize=7, frameon=False)
    fig.savefig(path)
    return path
