"""``report.md``, ``landscape_interpolation.png`` and ``landscape_surface.png`` of ``effopt landscape``."""

from __future__ import annotations

import math
from pathlib import Path

from .metrics import mean_std

CONNECTED = 0.02  # a barrier below 2 % of the end losses' mean counts as "linearly connected"


def _ms(values: list[float], digits: int = 3) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    mean, std = mean_std(vals)
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if len(vals) > 1 else "")


def barrier_summary(data: dict) -> list[dict]:
    """Per optimizer compared with the reference: barrier heights over seeds (train and validation)."""
    out = {}
    for p in data["pairs"]:
        a = out.setdefault(p["b"], {"optimizer": p["b"], "reference": p["a"], "train": [], "val": [], "train_rel": [],
                                    "val_rel": [], "end_train": []})  # fmt: skip
        for split in ("train", "val"):
            a[split].append(p[f"{split}_barrier"]["height"])
            a[f"{split}_rel"].append(p[f"{split}_barrier"]["relative"])
        a["end_train"].append((p["path"]["train"][0], p["path"]["train"][-1]))
    return list(out.values())


def _verdict(rels: list[float | None]) -> str:
    vals = [r for r in rels if r is not None]
    if not vals:
        return "not measurable (a loss on the path was not finite)"
    worst = max(vals)
    if worst <= CONNECTED:
        return f"linearly connected in every seed (largest barrier {100 * worst:.2f} % of the end losses, below {100 * CONNECTED:.0f} %)"
    n = sum(v > CONNECTED for v in vals)
    return f"**not** linearly connected in {n} of {len(vals)} seed(s) (largest barrier {100 * worst:.1f} % of the end losses)"


def findings(data: dict) -> list[str]:
    """Plain sentences: barriers per optimizer (with the control), then flatness from the surfaces."""
    lines = []
    b = data["settings"]["base"]
    lines.append(f"- Setting: {b['model']} on {b['data']}, {b['steps']} steps, lr {b['lr']:g}; runs of one seed start "
                 "from the same initialization and see the same batches.")  # fmt: skip
    for s in barrier_summary(data):
        lines.append(f"- **{s['reference']} -> {s['optimizer']}**: train-loss barrier {_ms(s['train'], 4)} over "
                     f"{len(s['train'])} seed(s), validation {_ms(s['val'], 4)}; {_verdict(s['train_rel'])}.")  # fmt: skip
    c = data.get("control")
    if c:
        tb, vb = c["train_barrier"], c["val_barrier"]
        lines.append(f"- Control, {c['a']} seed {c['seed_a']} -> seed {c['seed_b']} (different initializations): train barrier "
                     f"{_fmt(tb['height'])} ({_pct(tb['relative'])} of the end losses), validation {_fmt(vb['height'])}: "
                     "what a barrier between unrelated solutions looks like here.")  # fmt: skip
    by_seed = {}
    for s in data["surfaces"]:
        by_seed.setdefault(s["seed"], []).append(s)
    for seed, surfs in by_seed.items():
        for r in sorted({r for s in surfs for r in s["rise"]}, key=float):
            parts = [f"{s['optimizer']} {_fmt(s['rise'].get(r))}" for s in surfs]
            lines.append(f"- Surface (seed {seed}): mean train-loss rise at filter-normalized distance {r}: {', '.join(parts)} "
                         "(lower: flatter).")  # fmt: skip
    return lines


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f} %"


def plot_interpolation(data: dict, path: Path) -> Path | None:
    """Train (solid) and validation (dashed) loss along each path; the control in grey."""
    from ..analysis.plots import line_styles, pyplot

    plt = pyplot()
    if plt is None or not data["pairs"]:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = line_styles(list(dict.fromkeys(p["b"] for p in data["pairs"])))
    for p in data["pairs"]:
        st = styles[p["b"]]
        ax.plot(p["path"]["t"], p["path"]["train"], color=st["color"], marker=st["marker"], markersize=3,
                label=f"{p['a']} -> {p['b']} (seed {p['seed_a']})")  # fmt: skip
        ax.plot(p["path"]["t"], p["path"]["val"], color=st["color"], linestyle="--", linewidth=1)
    c = data.get("control")
    if c:
        ax.plot(c["path"]["t"], c["path"]["train"], color="#7f7f7f", label=f"control: {c['a']} seed 0 -> seed 1")
        ax.plot(c["path"]["t"], c["path"]["val"], color="#7f7f7f", linestyle="--", linewidth=1)
    ax.set_xlabel("t (0: first solution, 1: second)")
    ax.set_ylabel("loss (solid: train, dashed: validation)")
    ax.set_title("Loss along the straight line between two solutions")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_surfaces(data: dict, path: Path) -> Path | None:
    """Contours of the train-loss rise over each solution (shared levels), one panel per solution."""
    from ..analysis.plots import pyplot

    plt = pyplot()
    surfs = data["surfaces"]
    if plt is None or not surfs:
        return None
    fig, axes = plt.subplots(1, len(surfs), figsize=(4.8 * len(surfs) + 1.2, 4.2), squeeze=False)
    fig.subplots_adjust(wspace=0.35)
    rises = []
    for s in surfs:
        mid = len(s["coords"]) // 2
        c = s["loss"][mid][mid]
        rises.append([[(v - c) if v is not None and c is not None else math.nan for v in row] for row in s["loss"]])
    finite = sorted(v for r in rises for row in r for v in row if math.isfinite(v)) or [0.0, 1.0]
    # levels at quantiles of all panels' values: as much detail near the solutions as at the grid's edges
    levels = sorted({finite[round(i * (len(finite) - 1) / 14)] for i in range(15)})
    if len(levels) < 2:
        levels = [levels[0] - 1e-9, levels[0] + 1e-9]
    for ax, s, rise in zip(axes[0], surfs, rises):
        filled = ax.contourf(s["coords"], s["coords"], list(zip(*rise)), levels=levels, cmap="viridis")
        ax.contour(s["coords"], s["coords"], list(zip(*rise)), levels=levels, colors="white", linewidths=0.4)
        ax.plot([0], [0], "r*")
        ax.set_title(f"{s['optimizer']} (seed {s['seed']}): loss - loss(solution)", fontsize=9)
        ax.set_xlabel("direction 1 (filter-normalized)")
        ax.set_ylabel("direction 2")
    fig.colorbar(filled, ax=list(axes[0]), shrink=0.85, label="train-loss rise (shared levels, at quantiles)", format="%.3g")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def write_report(data: dict, out: Path) -> Path:
    """The figures and ``report.md`` in ``out``; returns the report's path."""
    figs = [(plot_interpolation(data, out / "landscape_interpolation.png"), "interpolation"),
            (plot_surfaces(data, out / "landscape_surface.png"), "surfaces")]  # fmt: skip
    rows = ["| optimizer | seed | final train loss | final val loss | test loss |", "|---|---:|---:|---:|---:|"]
    for r in data["runs"]:
        rows.append(f"| {r['optimizer']} | {r['seed']} | {_fmt(r['final_train_loss'])} | "
                    f"{'diverged' if r['diverged'] else _fmt(r['final_val_loss'])} | {_fmt(r.get('test_loss'))} |")  # fmt: skip
    text = (f"# Loss landscape and mode connectivity\n\nCommand: `{data.get('command', 'effopt landscape')}` "
            f"({data['seconds']:.0f} s)\n\nBarrier: the largest excess of the loss along the straight line between two "
            "solutions over the line between their two losses; train loss on fixed training batches, validation on the "
            "harness's validation batches. Surfaces: train loss around each solution along two Gaussian directions "
            "rescaled filter by filter (rows of each weight matrix) to the solution's norms, biases and norms not moved "
            f"(Li et al. 2018).\n\n## Findings\n\n" + "\n".join(findings(data)) + "\n\n## Runs\n\n" + "\n".join(rows) + "\n"
            + "".join(f"\n![{name}]({p.name})\n" for p, name in figs if p is not None))  # fmt: skip
    path = out / "report.md"
    path.write_text(text)
    return path
