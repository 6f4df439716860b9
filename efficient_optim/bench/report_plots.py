"""The figures of a run folder's report: ``loss_curves.png``, ``pareto.png`` and ``step_time.png``.

Every optimizer gets its own colour, dash pattern and marker (``analysis.plots.line_styles``), AdamW is drawn
thick and black on top, training and validation loss have a panel each, and a curve says it is a mean over
seeds only when it is one.
"""

from __future__ import annotations

from pathlib import Path

from ..analysis.plots import line_styles, pyplot
from .metrics import MetricsLog
from .report import BASELINES, Group, group_runs, pareto_front


def curves(out: Path, group: Group, kind: str, key: str) -> tuple[list[int], list[float]]:
    """Mean over finished seeds of ``key`` in ``kind`` records at each step every seed logged."""
    per_seed = []
    for r in group.ok:
        recs = MetricsLog(out / r["run_id"] / "metrics.jsonl").read()
        per_seed.append({rec["step"]: rec[key] for rec in recs if rec.get("kind") == kind and rec.get(key) is not None})
    if not per_seed:
        return [], []
    steps = sorted(set.intersection(*(set(d) for d in per_seed)))
    return steps, [sum(d[s] for d in per_seed) / len(per_seed) for s in steps]


def curve_label(group: Group) -> str:
    """The legend entry: the group's label, plus "mean of N seeds" only when N > 1."""
    n = len(group.ok)
    return group.label + (f" (mean of {n} seeds)" if n > 1 else "")


def _baseline_label(groups: list[Group]) -> str | None:
    for name in BASELINES:
        for g in groups:
            if g.optimizer == name and g.ok:
                return g.label
    return None


def draw_loss_curves(out: Path, groups: list[Group], plt):
    """The loss figure (train left, validation right); returns it unsaved (tests inspect its lines)."""
    styles = line_styles([g.label for g in groups], _baseline_label(groups))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, (kind, key, title) in zip(axes, (("train", "train_loss", "training loss"), ("eval", "val_loss", "validation loss"))):
        for g in groups:
            steps, values = curves(out, g, kind, key)
            if steps:
                st = styles[g.label]
                ax.plot(steps, values, label=curve_label(g), markersize=4, markevery=max(1, len(steps) // 8), **st)
        ax.set_xlabel("step")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss")
    axes[1].set_ylabel("loss")
    axes[0].legend(fontsize=7)
    seeds = {len(g.ok) for g in groups if g.ok}
    fig.suptitle("Loss, " + ("one seed per optimizer" if seeds == {1} else
                             f"mean over {seeds.pop()} seeds" if len(seeds) == 1 else "mean over the seeds in the legend"))  # fmt: skip
    fig.tight_layout()
    return fig


def draw_step_times(groups: list[Group], plt):
    """Horizontal bars of the median step time with the interquartile range as whiskers (None: no timings)."""
    timed = [g for g in groups if g.stat("step_time_ms")[0]]
    if not timed:
        return None
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(timed) + 1.8))
    mids = [g.stat("step_time_ms")[0] for g in timed]
    lo = [max(0.0, m - (g.step_time_iqr()[0] if g.step_time_iqr()[0] is not None else m)) for g, m in zip(timed, mids)]
    hi = [max(0.0, (g.step_time_iqr()[1] if g.step_time_iqr()[1] is not None else m) - m) for g, m in zip(timed, mids)]
    bars = ax.barh([g.label + (" *" if g.timing_loaded else "") for g in timed], mids, xerr=[lo, hi], capsize=3)
    for bar, g in zip(bars, timed):
        if g.timing_loaded:
            bar.set_hatch("//")
            bar.set_alpha(0.6)
    ax.set_xlabel("step time, ms (forward + backward + optimizer): median, whiskers IQR over steps")
    if any(g.timing_loaded for g in timed):
        ax.set_title("* hatched: measured on a loaded machine, not comparable", fontsize=8)
    ax.invert_yaxis()
    fig.tight_layout()
    return fig


def draw_pareto(groups: list[Group], plt):
    """Optimizer state vs final validation perplexity, with the Pareto front (None: nothing to draw)."""
    pts = [(g.stat("state_bytes")[0], g.stat("val_ppl")[0], g.label) for g in groups if g.ok]
    pts = [p for p in pts if p[0] and p[1]]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for x, y, label in pts:
        ax.scatter([x / 2**20], [y])
        ax.annotate(label, (x / 2**20, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = pareto_front([(x, y) for x, y, _ in pts])
    ax.plot([x / 2**20 for x, _ in front], [y for _, y in front], "k--", linewidth=0.8, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("optimizer state (MiB, log scale)")
    ax.set_ylabel("final validation perplexity")
    ax.set_title("Memory vs quality" + (" (one seed: a hint)" if all(len(g.ok) == 1 for g in groups if g.ok) else ""))
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot(out: Path, runs: list[dict]) -> list[Path]:
    """Write the three plots into ``out``; returns their paths (none if matplotlib is missing)."""
    plt = pyplot()
    if plt is None:
        return []
    groups = group_runs(runs)
    paths = []
    figures = (("loss_curves.png", draw_loss_curves(out, groups, plt)), ("pareto.png", draw_pareto(groups, plt)),
               ("step_time.png", draw_step_times(groups, plt)))  # fmt: skip
    for name, fig in figures:
        if fig is not None:
            paths.append(out / name)
            fig.savefig(paths[-1], dpi=120)
            plt.close(fig)
    return paths
