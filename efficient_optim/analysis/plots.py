"""Figures from probe records (``StateProbe.records`` or ``read_probes("probes.jsonl")``), with matplotlib.

    from efficient_optim.analysis.plots import plot_probes
    plot_probes(read_probes("run/probes.jsonl"), "run/")   # -> probe_stats.png, probe_error.png, probe_hist.png

Every function returns the path it wrote, or ``None`` when there is nothing to draw (or no matplotlib).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from .probe import error_series
from .stats import HIST_EDGES, growth_exponent

# Colour-blind-safe colours (Okabe-Ito without its pale yellow, Tol indigo, then tab10 browns and greys), line styles and markers: combined so that every
# line of a plot with up to 40 lines differs from every other in colour, dash pattern or marker.
COLORS = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#332288", "#8c564b", "#7f7f7f", "#bcbd22")
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
BASELINE_STYLE = {"color": "black", "linestyle": "-", "marker": None, "linewidth": 2.2, "zorder": 5}


def line_styles(labels: list[str], baseline: str | None = None) -> dict[str, dict]:
    """A distinct matplotlib style (``color``, ``linestyle``, ``marker``, ``linewidth``, ``zorder``) per label.

    Args:
        labels: the lines of one plot, in drawing order.
        baseline: the label drawn as the reference (thick black, on top of the others so it is never hidden);
            ``None``: no reference line.
    """
    styles, i = {}, 0
    for label in labels:
        if label == baseline:
            styles[label] = dict(BASELINE_STYLE)
            continue
        styles[label] = {"color": COLORS[i % len(COLORS)], "linestyle": LINESTYLES[i % len(LINESTYLES)],
                         "marker": MARKERS[i % len(MARKERS)], "linewidth": 1.4, "zorder": 3}  # fmt: skip
        i += 1
    return styles


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or ``None`` when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        return None


def state_series(records: list[dict], state: str, key: str, reduce=statistics.median) -> tuple[list[int], list[float]]:
    """``reduce`` over parameters (default median) of ``key`` of one state, per probed step."""
    by_step: dict[int, list[float]] = {}
    for r in records:
        if r.get("kind") == "state" and r.get("state") == state and r.get(key) is not None:
            by_step.setdefault(r["step"], []).append(r[key])
    steps = sorted(by_step)
    return steps, [reduce(by_step[s]) for s in steps]


def _states(records: list[dict]) -> list[str]:
    return sorted({r["state"] for r in records if r.get("kind") == "state"})


def plot_state_statistics(records: list[dict], path) -> Path | None:
    """Kurtosis, absmax/std, outlier fraction and top-position persistence over steps (median over
    parameters), one line per state."""
    plt = pyplot()
    states = _states(records)
    if plt is None or not states:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = [("kurtosis", "kurtosis (Gaussian = 3)", True), ("absmax_over_std", "max|x| / std", True),
              ("outlier_frac", "fraction beyond 6 std", False), ("top_persistence", "top-0.1% positions kept since last probe", False)]  # fmt: skip
    for ax, (key, title, logy) in zip(axes.flat, panels):
        for s in states:
            steps, vals = state_series(records, s, key)
            if steps:
                ax.plot(steps, vals, label=s)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        if logy:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.suptitle("State statistics (median over parameters)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_errors(records: list[dict], path) -> Path | None:
    """Relative L2 error of each stored state against its fp32 shadow over steps (log-log), mean over
    parameters, with the fitted growth exponent in the legend."""
    plt = pyplot()
    states = [s for s in _states(records) if any(r.get("state") == s and "err_l2" in r for r in records)]
    if plt is None or not states:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in states:
        ser = error_series(records, s)
        pts = [(st, v) for st, v in zip(ser["steps"], ser["err_rel_l2"]) if v]
        if not pts:
            continue
        fit = growth_exponent([p[0] for p in pts], [p[1] for p in pts])
        label = s + (f" (alpha = {fit['alpha']:.2f})" if fit else "")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", markersize=3, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("||stored - exact|| / ||exact||")
    ax.set_title("Error of the stored states against an exact fp32 shadow")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def histogram_matrix(records: list[dict], param: str, state: str) -> tuple[list[int], list[list[float]]]:
    """Steps and normalized log-magnitude histograms (fractions per bin) of one parameter's state."""
    rows = [r for r in records if r.get("kind") == "state" and r.get("param") == param and r.get("state") == state and "hist" in r]
    steps = [r["step"] for r in rows]
    mats = []
    for r in rows:
        total = sum(r["hist"]) + r.get("hist_zeros", 0)
        mats.append([c / total if total else 0.0 for c in r["hist"]])
    return steps, mats


def plot_histograms(records: list[dict], path, param: str | None = None) -> Path | None:
    """Heat maps of the log10|x| histogram over steps, one panel per state of ``param`` (default: the
    largest parameter)."""
    plt = pyplot()
    if plt is None:
        return None
    if param is None:
        sizes = {r["param"]: r["numel"] for r in records if r.get("kind") == "state"}
        if not sizes:
            return None
        param = max(sizes, key=sizes.get)
    states = _states([r for r in records if r.get("param") == param])
    if not states:
        return None
    fig, axes = plt.subplots(1, len(states), figsize=(5 * len(states), 4), squeeze=False)
    for ax, s in zip(axes[0], states):
        steps, mats = histogram_matrix(records, param, s)
        if not steps:
            continue
        data = [[math.log10(v) if v > 0 else -6 for v in row] for row in mats]
        im = ax.imshow(list(zip(*data)), aspect="auto", origin="lower", cmap="viridis", vmin=-6, vmax=0,
                       extent=(0, len(steps), HIST_EDGES[0], HIST_EDGES[-1]))  # fmt: skip
        ticks = list(range(0, len(steps), max(1, len(steps) // 6)))
        ax.set_xticks([t + 0.5 for t in ticks])
        ax.set_xticklabels([str(steps[t]) for t in ticks], fontsize=7)
        ax.set_xlabel("probe step")
        ax.set_ylabel("log10 |value|")
        ax.set_title(f"{param}: {s}", fontsize=8)
        fig.colorbar(im, ax=ax, label="log10 fraction")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_probes(records: list[dict], out_dir) -> list[Path]:
    """``probe_stats.png``, ``probe_error.png`` (if there is a shadow) and ``probe_hist.png`` in ``out_dir``."""
    out = Path(out_dir)
    paths = [plot_state_statistics(records, out / "probe_stats.png"), plot_errors(records, out / "probe_error.png"),
             plot_histograms(records, out / "probe_hist.png")]  # fmt: skip
    return [p for p in paths if p is not None]
