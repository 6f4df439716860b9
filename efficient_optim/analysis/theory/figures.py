"""Figures of ``effopt theory`` from its ``theory.json`` data (matplotlib; each returns ``None`` without it)."""

from __future__ import annotations

import math
from pathlib import Path

from ..plots import line_styles, pyplot


def _save(fig, plt, path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_convergence(data: dict, path) -> Path | None:
    """Relative distance to the optimum against steps, one panel per problem, one line per optimizer."""
    plt = pyplot()
    runs = data.get("runs", [])
    if plt is None or not runs:
        return None
    problems = [p["name"] for p in data["problems"]]
    cols = min(3, len(problems))
    rows = math.ceil(len(problems) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.9 * rows), squeeze=False)
    labels = list(dict.fromkeys(r["optimizer"] for r in runs))
    styles = line_styles(labels)
    for ax, name in zip(axes.flat, problems):
        for r in (r for r in runs if r["problem"] == name):
            st = dict(styles[r["optimizer"]], marker=None)
            ax.plot(r["curve"]["steps"], [max(d, 1e-12) for d in r["curve"]["dist"]], label=r["optimizer"], **st)
        ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("||x - x*|| / ||x0 - x*||")
    for ax in list(axes.flat)[len(problems) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Distance to the optimum at a constant learning rate")
    return _save(fig, plt, path)


def plot_ema(data: dict, path) -> Path | None:
    """Accumulated EMA error ``||m - q||`` over steps (solid) against the independent (dashed) and aligned
    (dotted) geometric-sum predictions from the measured one-step errors; one panel per moment x regime."""
    plt = pyplot()
    runs = data.get("runs", [])
    if plt is None or not runs:
        return None
    panels = list(dict.fromkeys((r["moment"], r["beta"], r["regime"]) for r in runs))
    cols = min(2, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.6 * cols, 3.9 * rows), squeeze=False)
    styles = line_styles(list(dict.fromkeys(r["codec"] for r in runs)))
    for ax, (moment, beta, regime) in zip(axes.flat, panels):
        for r in (r for r in runs if (r["moment"], r["beta"], r["regime"]) == (moment, beta, regime)):
            c = r["curve"]
            color = styles[r["codec"]]["color"]
            ax.plot(c["steps"], c["err"], color=color, linewidth=1.5, label=r["codec"])
            ax.plot(c["steps"], c["independent"], color=color, linestyle="--", linewidth=0.9)
            ax.plot(c["steps"], c["aligned"], color=color, linestyle=":", linewidth=0.9)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("||exact EMA - stored||")
        ax.set_title(f"{moment} (beta {beta:g}), {regime} gradients", fontsize=9)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, title="solid: measured; dashed: independent;\ndotted: aligned prediction",
                        title_fontsize=6)  # fmt: skip
    fig.suptitle("Quantization error accumulated in a moment EMA")
    return _save(fig, plt, path)


def plot_bits(data: dict, path) -> Path | None:
    """Reachable epsilon against bits (2-8), one panel per stored quantity, with the representability bound."""
    plt = pyplot()
    runs = data.get("runs", [])
    if plt is None or not runs:
        return None
    targets = list(dict.fromkeys(r["target"] for r in runs))
    fig, axes = plt.subplots(1, len(targets), figsize=(5.6 * len(targets), 4.2), squeeze=False)
    labels = list(dict.fromkeys(r["label"] for r in runs))
    styles = line_styles(labels)
    bound = data["lower_bound"]
    for ax, target in zip(axes[0], targets):
        for r in (r for r in runs if r["target"] == target):
            bits = [int(b) for b in r["eps"]]
            eps = [min(max(e, 1e-9), 10.0) if e is not None and math.isfinite(e) else 10.0 for e in r["eps"].values()]
            style = (dict(color="#7f7f7f", linestyle=":", marker=None, linewidth=1.6) if r["label"].startswith("fp32")
                     else styles[r["label"]])  # fmt: skip
            ax.plot(bits, eps, label=r["label"], **style)
        bits = [int(b) for b in bound]
        ax.plot(bits, list(bound.values()), color="black", linewidth=2.2, label="best representable point (bound)")
        ax.plot(bits, list(data["bound_formula"].values()), color="grey", linestyle="--", linewidth=1.2,
                label="uniform-rounding formula")  # fmt: skip
        ax.set_yscale("log")
        ax.set_xlabel("bits per stored element")
        ax.set_ylabel("reachable ||x - x*|| / ||x*||")
        ax.set_title(f"{target} stored at b bits", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"Bits vs reachable epsilon ({data['problem']})")
    return _save(fig, plt, path)
