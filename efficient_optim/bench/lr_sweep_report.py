"""Words and figures of a learning-rate sweep, from ``lr_sweep.json``'s data (``lr_sweep_analysis.analyse``)."""

from __future__ import annotations

from pathlib import Path

from .lr_sweep_analysis import BASIN, SPIKE


def subject(spec: str, warmup: int, data: dict) -> str:
    """``spec``, with its warm-up when the sweep has several."""
    several = len({c["warmup"] for c in data["curves"]}) > 1
    return f"{spec} [warm-up {warmup}]" if several else spec


def loss_text(mean: float | None, std: float | None) -> str:
    """``2.4312 ± 0.0101`` (no std with one seed), or ``diverged``."""
    if mean is None:
        return "diverged"
    return f"{mean:.4f}" + ("" if std is None else f" ± {std:.4f}")


def basin_text(c: dict) -> str:
    """The basin of one curve in words: its lrs, its width in decades and as a factor."""
    lo, hi = c["basin_lo"], c["basin_hi"]
    edge = " (reaches the grid's edge: wider than measured)" if c["basin_open_low"] or c["basin_open_high"] else ""
    if lo == hi:
        return f"only {lo:g} (narrower than one grid step){edge}"
    return f"{lo:g}..{hi:g}: {c['basin_decades']:.2f} decades, a factor {hi / lo:.1f}{edge}"


def divergence_text(c: dict) -> str:
    """Which lrs diverged and in how many of their seeds."""
    if not c["diverged"]:
        return "no run diverged"
    return "diverged at " + ", ".join(f"{lr:g} ({n}/{runs} seeds)" for lr, n, runs in c["diverged"])


def max_spike(c: dict) -> tuple[float, int, float]:
    """The largest train-loss spike ratio among a curve's runs, its step and its lr."""
    best = (1.0, 0, 0.0)
    for p in c["points"]:
        for ratio, step in zip(p["spikes"], p["spike_steps"]):
            if ratio > best[0]:
                best = (ratio, step, p["lr"])
    return best


def _seeds(data: dict) -> int:
    return max((len(p["losses"]) + p["diverged"] for c in data["curves"] for p in c["points"]), default=0)


def _curve_sentence(c: dict, data: dict) -> str:
    name = subject(c["optimizer"], c["warmup"], data)
    if c["best_lr"] is None:
        return f"- **{name}**: no lr of the grid finished every seed ({divergence_text(c)})."
    ratio, step, lr = max_spike(c)
    spike = (f"its largest train-loss spike was {ratio:.2f}x the running minimum (step {step}, lr {lr:g})"
             + (f", above the {SPIKE}x that counts as a spike" if ratio > SPIKE else ", below the "
                f"{SPIKE}x that counts as a spike"))  # fmt: skip
    return (f"- **{name}**: best lr {c['best_lr']:g} (final val loss {loss_text(c['best_loss'], c['best_std'])}); "
            f"lrs within {BASIN:.0%} of the best: {basin_text(c)}; {divergence_text(c)}; {spike}.")  # fmt: skip


def _gap_text(gap: float | None) -> str:
    if gap is None:
        return "not comparable (a seed diverged or did not run)"
    return f"{'within' if gap <= BASIN else 'not within'} {BASIN:.0%} ({gap * 100:+.2f}%)"


def spread_text(r: dict, key: str) -> str:
    """Whether comparison ``r``'s gap ``key`` (``own_best_gap``, ``shared_gap``, ...) is inside its seed spread."""
    gap, spread = r[key], r.get(f"{key}_spread")
    if gap is None:
        return "not comparable"
    if spread is None:
        return "the seed spread is unknown (one seed)"
    return f"gap {'inside' if abs(gap) <= spread else 'outside'} the seed spread ({spread * 100:.2f}%)"


def _comparison_sentence(r: dict, data: dict) -> str:
    name = subject(r["optimizer"], r["warmup"], data)
    ref = next(c for c in data["curves"] if c["optimizer"] == r["reference"] and c["warmup"] == r["warmup"])
    mine = next(c for c in data["curves"] if c["optimizer"] == r["optimizer"] and c["warmup"] == r["warmup"])
    width = ""
    if mine["basin_decades"] is not None and ref["basin_decades"] is not None:
        d, rd = mine["basin_decades"], ref["basin_decades"]
        word = "narrower than" if d < rd else "wider than" if d > rd else "as wide as"
        width = f" Its {BASIN:.0%} basin ({d:.2f} decades) is {word} AdamW's ({rd:.2f})."
    best = f"{r['best_lr']:g}" if r["best_lr"] is not None else "none"
    ref_best = f"{r['reference_best_lr']:g}" if r["reference_best_lr"] is not None else "none"
    return (f"- **{name}** vs AdamW: at each one's own best lr ({best} vs {ref_best}) {_gap_text(r['own_best_gap'])}; "
            f"at AdamW's best lr {_gap_text(r['at_reference_best_gap'])}; at the shared lr {r['shared_lr']:g} "
            f"{_gap_text(r['shared_gap'])}.{width} Best vs best: {spread_text(r, 'own_best_gap')}.")  # fmt: skip


def findings_markdown(data: dict) -> str:
    """``report.md``'s findings: one sentence per curve, one per comparison with AdamW."""
    seeds = _seeds(data)
    lines = ["## Findings", ""]
    if seeds < 2:
        lines += ["One seed per point: every statement below is a hint, not a finding.", ""]
    else:
        lines += [f"Up to {seeds} seeds per point; mean ± std over the seeds that did not diverge.", ""]
    lines += [_curve_sentence(c, data) for c in data["curves"]]
    if data["comparisons"]:
        lines += ["", f"Compared with AdamW at the same warm-up (\"as good as\" = final val loss within {BASIN:.0%}):", ""]
        lines += [_comparison_sentence(r, data) for r in data["comparisons"]]
    return "\n".join(lines) + "\n"


def points_markdown(data: dict) -> str:
    """Every point of every curve: lr, seeds, final val loss, and the largest spike."""
    lines = ["## Final validation loss per lr", "", "| optimizer | warm-up | lr | seeds ok | final val loss | largest spike |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for c in data["curves"]:
        for p in c["points"]:
            mark = " **best**" if p["lr"] == c["best_lr"] else ""
            spike = max(p["spikes"], default=1.0)
            lines.append(f"| {c['optimizer']} | {c['warmup']} | {p['lr']:g}{mark} | {len(p['losses'])}/{len(p['losses']) + p['diverged']} "
                         f"| {loss_text(p['mean'], p['std'])} | {spike:.2f}x |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot_curves(data: dict, path: Path) -> Path | None:
    """``lr_sweep.png``: final val loss vs lr per curve (error bars: seed std; x: an lr with a diverged seed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = ["-o", "--s", ":^", "-.D", "-v", "--P", ":X", "-.*"]
    finite = [p["mean"] for c in data["curves"] for p in c["points"] if p["mean"] is not None]
    top = max(finite, default=1.0)
    for i, c in enumerate(data["curves"]):
        ok = [p for p in c["points"] if p["mean"] is not None and not p["diverged"]]
        label = subject(c["optimizer"], c["warmup"], data)
        line = ax.errorbar([p["lr"] for p in ok], [p["mean"] for p in ok], yerr=[p["std"] or 0 for p in ok],
                           fmt=styles[i % len(styles)], capsize=3, markersize=4, label=label)  # fmt: skip
        color = line[0].get_color()
        bad = [p["lr"] for p in c["points"] if p["diverged"]]
        if bad:
            ax.plot(bad, [top] * len(bad), "x", color=color, markersize=8)
        if c["best_lr"] is not None:
            ax.plot([c["best_lr"]], [c["best_loss"]], "*", color=color, markersize=12)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate (AdamW scale)")
    ax.set_ylabel("final validation loss")
    many = _seeds(data) >= 2
    ax.set_title("Final val loss vs lr" + (" (mean ± std over seeds)" if many else " (one seed)") + "; *: best, x: diverged")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
