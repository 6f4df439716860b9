"""The figures of the characterization report (``effopt characterize``): ``fig_*.png`` in the study folder.

Rendering only: the numbers come from ``analysis.characterization`` (``analyze``'s result, ``error_summary``)
and the probe records; nothing here computes a result the report states.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..analysis.characterization import STATE_NAMES, STATES, error_summary
from ..analysis.plots import plot_histograms, pyplot


def _loss_figure(plt, out: Path, a: dict, records: dict, curves: dict) -> list[Path]:
    """Training-loss curves: fp32, 8-bit, naive 4-bit and each fix alone | the zero-free base + each fix, combined."""
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    panels = [("core", "fix"), ("stage2", "combined")]
    for ax, stages in zip(axes, panels):
        for c in a["configs"]:
            if c["stage"] not in stages and not (c["key"] == "fp32"):
                continue
            if c["key"] not in curves:
                continue
            steps, loss = curves[c["key"]]
            if not steps:
                continue
            line = ax.plot(steps, loss, label=c["label"][:60], linewidth=1)[0]
            if c["diverged"]:
                ax.plot([steps[-1]], [loss[-1]], "x", color=line.get_color(), markersize=8)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_yscale("log")
        ax.legend(fontsize=6)
    axes[0].set_title("fp32, 8-bit, naive 4-bit and each fix alone (x: diverged)", fontsize=9)
    axes[1].set_title("zero-free base + each fix; combined", fontsize=9)
    fig.tight_layout()
    paths.append(out / "fig_loss.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def _error_growth_figure(plt, out: Path, a: dict, records: dict, curves: dict) -> list[Path]:
    """The m and v errors over time of every non-diverged quantized configuration, with growth exponents."""
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    drew = False
    for ax, s in zip(axes, STATES):
        for c in a["configs"]:
            if c["stage"] in ("sensitivity", "lr", "escalation", "control") or c["key"] == "fp32" or c["diverged"]:
                continue
            es = error_summary(records.get(c["key"], []))
            e = es.get(STATE_NAMES[s])
            if not e:
                continue
            pts = [(st, v) for st, v in zip(e["series"]["steps"], e["series"]["rel"]) if v]
            if pts:
                fit = e.get("growth_rel")
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", linewidth=1,
                        label=f"{c['label'][:45]}" + (f" (a={fit['alpha']:.2f})" if fit else ""))  # fmt: skip
                drew = True
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("mean ||stored - exact|| / ||exact||")
        ax.set_title(f"{STATE_NAMES[s]}: error against the fp32 shadow (a: growth exponent of the relative error)", fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    if drew:
        paths.append(out / "fig_error_growth.png")
        fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def _distributions_figure(plt, out: Path, a: dict, records: dict, curves: dict) -> list[Path]:
    """The fp32 run's kurtosis, outlier fraction and outlier persistence over time; its histograms."""
    paths = []
    d = a["answers"]["distributions"]
    if d.get("measured"):
        fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
        for s in ("m", "v"):
            ser = d[s]["series"]
            axes[0].plot(d["steps"], ser["kurtosis"], label=s)
            axes[1].plot(d["steps"], [x if x else None for x in ser["outlier_frac"]], label=s)
            axes[2].plot(d["steps"], ser["top_persistence"], label=s)
        axes[0].set_yscale("log")
        axes[0].set_title("kurtosis (median over matrices; Gaussian 3)", fontsize=9)
        axes[1].set_title("fraction of entries beyond 6 std", fontsize=9)
        axes[2].set_title(f"top-{100 * d.get('outlier_top', 1e-3):g} % positions kept since the last probe", fontsize=9)
        for ax in axes:
            ax.set_xlabel("step")
            ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out / "fig_distributions.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
        if "fp32" in records:
            p = plot_histograms(records.get("fp32", []), out / "fig_histograms_fp32.png")
            if p:
                paths.append(p)
    return paths


def _naive_figure(plt, out: Path, a: dict, records: dict, curves: dict) -> list[Path]:
    """Naive 4-bit's update ratio per layer against fp32's at the first step that uses stored states."""
    paths = []
    n = a["answers"]["naive"]
    blow = [b for b in (n.get("layers_by_update_blowup") or []) if math.isfinite(b["x_fp32"])]
    if blow:
        fig, ax = plt.subplots(figsize=(8, 0.3 * len(blow) + 1.5))
        ax.barh([b["param"].replace("transformer.", "") for b in blow], [b["x_fp32"] for b in blow])
        ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set_xlabel(f"naive 4-bit update ratio / fp32's at step {n['compare_step']}")
        ax.tick_params(axis="y", labelsize=7)
        fig.tight_layout()
        paths.append(out / "fig_naive_failure.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def _correction_figure(plt, out: Path, a: dict, records: dict, curves: dict) -> list[Path]:
    """M's error over time with error correction every K steps."""
    paths = []
    by_key = {c["key"]: c for c in a["configs"]}
    keys = [k for k in ("zerofree", "zerofree+ec10", "zerofree+ec100", "zerofree+ec1000", "8bit") if k in records and by_key.get(k) and not by_key[k]["diverged"]]
    if keys:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for k in keys:
            e = error_summary(records[k]).get("m")
            if e:
                ax.plot(e["series"]["steps"], e["series"]["rel"], label=by_key[k]["label"][:60], linewidth=1)
        ax.set_xlabel("step")
        ax.set_ylabel("m: mean relative error against the fp32 shadow")
        ax.set_yscale("log")
        ax.set_title("Error correction every K steps (P5)", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "fig_correction.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def _synthetic_figure(plt, out: Path, a: dict, records: dict, curves: dict) -> list[Path]:
    """The synthetic sequence's errors with and without correction."""
    paths = []
    syn = a.get("p5_synthetic")
    if syn and syn.get("steps"):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
        for ax, (case, beta) in zip(axes, (("m", 0.9), ("v", 0.999))):
            for name, vals in syn[case].items():
                ax.plot(syn["steps"], vals, label=name, linewidth=1)
            ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.set_ylabel("||stored - exact|| / ||exact||")
            ax.set_title(f"synthetic {case} (EMA beta {beta}), naive 4-bit, with / without correction every K", fontsize=8)
            ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "fig_p5_synthetic.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def _sensitivity_figure(plt, out: Path, a: dict, records: dict, curves: dict) -> list[Path]:
    """The val-loss gap with one layer group at 4 bits."""
    paths = []
    la = a["answers"]["layers"]
    if la["sensitivity"]:
        sens = la["sensitivity"]
        fig, ax = plt.subplots(figsize=(7, 0.35 * len(sens) + 1.5))
        vals = [x["gap_pct"] if x["gap_pct"] is not None else 0 for x in sens]
        colors = ["tab:red" if x["diverged"] else "tab:blue" for x in sens]
        ax.barh([x["group"] for x in sens], vals, color=colors)
        ax.invert_yaxis()
        ax.set_xlabel("val-loss gap (%) with this group at 4 bits, the rest fp32 (red: diverged)")
        fig.tight_layout()
        paths.append(out / "fig_sensitivity.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def _sharpness_figure(plt, out: Path, a: dict, records: dict, curves: dict) -> list[Path]:
    """The top Hessian eigenvalue over training."""
    paths = []
    by_key = {c["key"]: c for c in a["configs"]}
    sh = a["answers"]["sharpness"]
    if sh:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for k, v in sh.items():
            ax.plot(v["steps"], v["eigenvalue"], "o-", label=by_key[k]["label"][:50] if k in by_key else k)
        ax.set_xlabel("step")
        ax.set_ylabel("top Hessian eigenvalue")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "fig_sharpness.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


FIGURES = (_loss_figure, _error_growth_figure, _distributions_figure, _naive_figure, _correction_figure, _synthetic_figure, _sensitivity_figure, _sharpness_figure)


def figures(out: Path, a: dict, records: dict[str, list[dict]], curves: dict[str, tuple[list, list]]) -> list[Path]:
    """Draw every figure the study's data allows; returns their paths (none without matplotlib).

    Args:
        out: the study folder (figures are written there).
        a: ``analysis.characterization.analyze``'s result (plus ``p5_synthetic``).
        records: configuration key -> probe records of its first seed's run.
        curves: configuration key -> (steps, training losses) of its first seed's run.
    """
    plt = pyplot()
    if plt is None:
        return []
    paths = []
    for draw in FIGURES:
        paths += draw(plt, out, a, records, curves)
    return paths
