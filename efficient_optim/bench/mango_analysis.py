"""What a compression controller did over a run, from its ``controller`` lines in ``metrics.jsonl``
(``bench.mango_callback``): size-weighted mean bits per decision, phases of training stated in plain sentences
(what the gradients and the momentum got, per kind of layer, against the learning-rate schedule and the loss),
and a figure of per-layer bits over training drawn against the schedule and the loss.

    lines, trains = controller_records(run_dir), train_records(run_dir)
    for sentence in phase_sentences(lines, trains, total_steps=300):
        print(sentence)        # "steps 0-60: gradients 8.3 bits on average (embedding q8, attention q8, ...) ..."
"""

from __future__ import annotations

import collections
from pathlib import Path

from .metrics import MetricsLog
from .plan_report import layer_kind

PHASE_CHANGE = 0.15  # a new phase starts when mean gradient or momentum bits move this much (relative)
MAX_PHASES = 5


def controller_records(run_dir: Path) -> list[dict]:
    """The run's ``controller`` lines, in step order."""
    return [r for r in MetricsLog(run_dir / "metrics.jsonl").read() if r.get("kind") == "controller"]


def train_records(run_dir: Path) -> list[dict]:
    """The run's ``train`` lines (step, lr, train_loss)."""
    return [r for r in MetricsLog(run_dir / "metrics.jsonl").read() if r.get("kind") == "train"]


def layer_sizes(lines: list[dict]) -> dict[str, int]:
    """Elements of each layer (the first line that records ``numel``); empty when none does."""
    return next((r["numel"] for r in lines if "numel" in r), {})


def mean_bits(record: dict, sizes: dict[str, int], field: str) -> float | None:
    """Size-weighted mean of ``record[field]`` (``grad_bits`` or ``momentum_bits``) over the layers."""
    pairs = [(b, sizes.get(n, 1)) for n, b in record.get(field, {}).items() if b is not None]
    total = sum(w for _, w in pairs)
    return sum(b * w for b, w in pairs) / total if total else None


def _segments(lines: list[dict], sizes: dict[str, int]) -> list[list[dict]]:
    """Consecutive decisions grouped into phases (mean bits within ``PHASE_CHANGE`` of the phase's first)."""
    out: list[list[dict]] = []
    for rec in lines:
        g, m = mean_bits(rec, sizes, "grad_bits"), mean_bits(rec, sizes, "momentum_bits")
        if out:
            g0, m0 = mean_bits(out[-1][0], sizes, "grad_bits"), mean_bits(out[-1][0], sizes, "momentum_bits")
            same = all(a is None or b is None or abs(a - b) <= PHASE_CHANGE * max(abs(b), 1e-9) for a, b in ((g, g0), (m, m0)))
            if same:
                out[-1].append(rec)
                continue
        out.append([rec])
    while len(out) > MAX_PHASES:  # fold the shortest phase into its predecessor (or successor)
        i = min(range(len(out)), key=lambda k: len(out[k]))
        j = i - 1 if i > 0 else 1
        out[min(i, j)] = out[min(i, j)] + out[max(i, j)]
        del out[max(i, j)]
    return out


def _at(series: list[dict], step: int, key: str):
    """``key`` of the line nearest to ``step`` (train and controller lines: both have ``lr`` and ``train_loss``)."""
    rows = [r for r in series if r.get(key) is not None]
    return min(rows, key=lambda r: abs(r["step"] - step))[key] if rows else None


def _kinds(records: list[dict], field: str) -> str:
    """The most frequent spec per kind of layer over a phase: ``embedding q8, attention q4, MLP q2``."""
    counts: dict[str, collections.Counter] = {}
    for rec in records:
        for name, spec in rec.get(field, {}).items():
            counts.setdefault(layer_kind(name), collections.Counter())[spec] += 1
    return ", ".join(f"{kind} {c.most_common(1)[0][0]}" for kind, c in counts.items())


def _schedule_words(lr0, lr1, peak, top: tuple[int, float] | None = None) -> str:
    """The learning rate over a phase in words; ``top``: ``(step, lr)`` of the phase's highest learning rate."""
    if lr0 is None or lr1 is None:
        return ""
    if top is not None and top[1] > 1.05 * max(lr0, lr1):
        return f"the learning rate rises {lr0:.1e} -> {top[1]:.1e} (warm-up, to step {top[0]}), then decays to {lr1:.1e}"
    if lr1 > lr0 * 1.05:
        return f"the learning rate rises {lr0:.1e} -> {lr1:.1e} (warm-up)"
    if lr1 < lr0 * 0.95:
        return f"the learning rate decays {lr0:.1e} -> {lr1:.1e}" + (" from its peak" if peak and lr0 >= 0.95 * peak else "")
    return f"the learning rate stays near {lr0:.1e}"


def phases(lines: list[dict], trains: list[dict], total_steps: int) -> list[dict]:
    """The run's phases: ``start``, ``end`` (steps), ``grad_bits`` / ``momentum_bits`` (size-weighted means over
    the phase's decisions), ``grad`` / ``momentum`` (most frequent spec per kind of layer), ``lr`` and ``loss``
    (at its start and end, from the train lines)."""
    sizes = layer_sizes(lines)
    segs = _segments(lines, sizes)
    series = sorted(trains + lines, key=lambda r: r["step"])
    out = []
    for i, seg in enumerate(segs):
        start = seg[0].get("decision_step", seg[0]["step"])
        end = segs[i + 1][0].get("decision_step", segs[i + 1][0]["step"]) if i + 1 < len(segs) else total_steps
        g = [b for b in (mean_bits(r, sizes, "grad_bits") for r in seg) if b is not None]
        m = [b for b in (mean_bits(r, sizes, "momentum_bits") for r in seg) if b is not None]
        out.append({"start": start, "end": end, "decisions": len(seg),
                    "grad_bits": sum(g) / len(g) if g else None, "momentum_bits": sum(m) / len(m) if m else None,
                    "grad": _kinds(seg, "grad"), "momentum": _kinds(seg, "momentum"),
                    "lr": (_at(series, start + 1, "lr"), _at(series, end, "lr")),
                    "lr_top": max(((r["step"], r["lr"]) for r in series if start < r["step"] <= end and r.get("lr") is not None),
                                  key=lambda x: x[1], default=None),
                    "loss": (_at(series, start + 1, "train_loss"), _at(series, end, "train_loss"))})  # fmt: skip
    return out


def phase_sentences(lines: list[dict], trains: list[dict], total_steps: int) -> list[str]:
    """One plain sentence per phase (see ``phases``), e.g. ``steps 0-60: gradients 8.3 bits on average
    (embedding q8, attention q8, MLP q8), momentum 8.0 bits (8bit throughout); the learning rate rises ...;
    training loss 5.52 -> 3.10.``"""
    peak = max((r["lr"] for r in trains if r.get("lr") is not None), default=None)
    out = []
    for p in phases(lines, trains, total_steps):
        parts = [f"steps {p['start']}-{p['end']}"]
        words = []
        if p["grad_bits"] is not None:
            words.append(f"gradients {p['grad_bits']:.1f} bits on average ({p['grad']})")
        if p["momentum_bits"] is not None:
            words.append(f"momentum {p['momentum_bits']:.1f} bits ({p['momentum']})")
        text = f"{parts[0]}: " + ", ".join(words) if words else parts[0] + ": no choices recorded"
        sched = _schedule_words(*p["lr"], peak, p["lr_top"])
        loss0, loss1 = p["loss"]
        tail = [s for s in (sched, f"training loss {loss0:.2f} -> {loss1:.2f}" if loss0 is not None and loss1 is not None else "") if s]
        decisions = f" ({p['decisions']} decision{'s' if p['decisions'] != 1 else ''})"
        out.append(text + decisions + ("; " + "; ".join(tail) if tail else "") + ".")
    return out


def draw_phases(lines: list[dict], trains: list[dict], total_steps: int, title: str, plt):
    """Per-layer gradient bits and momentum bits over training (two heat maps, layers x steps) above the
    learning rate and the training loss; the figure, unsaved (``None`` with no decisions)."""
    import numpy as np
    from matplotlib.colors import LogNorm

    if not lines:
        return None
    names = list(lines[0].get("grad_bits", {}))
    edges = [r.get("decision_step", r["step"]) for r in lines] + [max(total_steps, lines[-1]["step"] + 1)]
    heights = [max(1.2, 0.2 * len(names))] * 2 + [1.6]
    fig, axes = plt.subplots(3, 1, figsize=(10, sum(heights) + 1.0), sharex=True, gridspec_kw={"height_ratios": heights})
    norm, mesh = LogNorm(vmin=0.25, vmax=32), None
    for ax, field, label in ((axes[0], "grad_bits", "gradient bits"), (axes[1], "momentum_bits", "momentum bits")):
        values = np.array([[r.get(field, {}).get(n) if r.get(field, {}).get(n) is not None else np.nan for r in lines]
                           for n in names], dtype=float)  # fmt: skip
        mesh = ax.pcolormesh(edges, np.arange(len(names) + 1), values, cmap="viridis", norm=norm, shading="flat")
        ax.set_yticks(np.arange(len(names)) + 0.5)
        ax.set_yticklabels([n.removeprefix("transformer.").removesuffix(".weight") for n in names], fontsize=5)
        ax.invert_yaxis()
        ax.set_ylabel(label, fontsize=8)
    axes[0].set_title(title, fontsize=9)
    series = sorted((r for r in trains + lines if r.get("lr") is not None), key=lambda r: r["step"])
    axes[2].plot([r["step"] for r in series], [r["lr"] for r in series], color="black", linewidth=1.2, label="lr")
    axes[2].set_ylabel("lr", fontsize=8)
    loss_ax = axes[2].twinx()
    losses = [r for r in trains if r.get("train_loss") is not None] or [r for r in series if r.get("train_loss") is not None]
    loss_ax.plot([r["step"] for r in losses], [r["train_loss"] for r in losses], color="#D55E00", linewidth=1.0)
    loss_ax.set_ylabel("train loss", fontsize=8, color="#D55E00")
    axes[2].set_xlabel("step")
    bar = fig.colorbar(mesh, ax=list(axes), ticks=[0.25, 0.5, 1, 2, 4, 8, 16, 32], fraction=0.03)
    bar.ax.set_yticklabels(["0.25", "0.5", "1", "2", "4", "8", "16", "32"])
    bar.set_label("bits per element", fontsize=8)
    return fig
