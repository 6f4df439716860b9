"""The plan in a report: which codec each parameter's states had over a run (``plan`` lines of ``metrics.jsonl``,
written by ``plan_log.PlanLogCallback``).

- ``plan_section(out, runs)``: report.md's "Optimizer-state plans" section: per optimizer and setting with a plan,
  the budget, the bytes of the final plan, the codec changes (mean ± std over seeds), the monitoring overhead
  and the final plan as codec counts per state; and a heat map per group under a budget (``plan_<group>.png``).
- ``draw_plan_heatmap``: layers x steps, colour = bits per parameter element of each state (one panel per state),
  under the learning-rate schedule with the re-plans marked.
- ``layer_kind`` / ``block_index``: what a parameter is (embedding, attention, MLP, ...) and its depth, from
  its name: the words the suites use to say which layers got the bits.

Small tensors (fewer than 4,096 elements: biases, norms) keep fp32 under every plan of the library and are left
out of the heat maps and counts (the small-tensor rule, ``policy.specs``).
"""

from __future__ import annotations

import collections
import re
import statistics
from pathlib import Path

from .config import slug
from .metrics import MetricsLog
from .report import Group, group_runs

SMALL_NUMEL = 4096
INLINE_FIGURES = 6  # up to this many heat maps are shown in report.md; more are only linked
STATE_SHORT = {"exp_avg": "m", "exp_avg_sq": "v"}


def plan_records(run_dir: Path) -> list[dict]:
    """The ``plan`` lines of ``run_dir/metrics.jsonl``, by step (empty when the run logged none)."""
    return sorted((r for r in MetricsLog(run_dir / "metrics.jsonl").read() if r.get("kind") == "plan"),
                  key=lambda r: r["step"])  # fmt: skip


def layer_kind(name: str) -> str:
    """``embedding``, ``attention``, ``MLP``, ``norm``, ``bias``, ``convolution``, ``fully connected`` or ``other``,
    from a parameter's name (GPT-2 / LLaMA names of ``transformers``, and the digits CNN's)."""
    low = name.lower()
    if low.endswith("bias"):
        return "bias"
    if any(k in low for k in ("wte", "wpe", "embed")):
        return "embedding"
    if any(k in low for k in ("ln_", "norm")):
        return "norm"
    if any(k in low for k in ("attn", "attention")):
        return "attention"
    if "mlp" in low:
        return "MLP"
    if "features" in low or "conv" in low:
        return "convolution"
    if any(k in low for k in ("head", "fc", "classifier", "lm_head")):
        return "fully connected"
    return "other"


def block_index(name: str) -> int | None:
    """The transformer block a parameter belongs to (``...h.3...`` or ``...layers.3...``), or ``None``."""
    m = re.search(r"\.(?:h|layers|layer|blocks)\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def shown_parameters(records: list[dict]) -> list[str]:
    """The parameters a plan summary shows: all but the small tensors whose states are fp32 throughout."""
    if not records:
        return []
    numel = next((r["numel"] for r in records if "numel" in r), {})
    names = list(records[0]["codecs"])
    fixed = {n for n in names if all(set(r["codecs"].get(n, {}).values()) <= {"fp32"} for r in records)}
    return [n for n in names if not (n in fixed and numel.get(n, SMALL_NUMEL) < SMALL_NUMEL)]


def codec_counts(record: dict, names: list[str]) -> str:
    """One plan as codec counts per state: ``m: 8bit x2, 4bit x6; v: factored x8``."""
    per_state: dict[str, collections.Counter] = {}
    for n in names:
        for state, codec in record["codecs"].get(n, {}).items():
            per_state.setdefault(state, collections.Counter())[codec] += 1
    return "; ".join(f"{STATE_SHORT.get(s, s)}: " + ", ".join(f"{c} x{k}" for c, k in cnt.most_common())
                     for s, cnt in per_state.items())  # fmt: skip


def _first_run(out: Path, g: Group) -> tuple[dict, list[dict]] | None:
    """The first finished seed of ``g`` that logged plans, with its plan records."""
    for r in sorted(g.ok, key=lambda r: r["seed"]):
        records = plan_records(out / r["run_id"])
        if records:
            return r, records
    return None


def _lr_curve(run_dir: Path) -> tuple[list[int], list[float]]:
    recs = [r for r in MetricsLog(run_dir / "metrics.jsonl").read() if r.get("kind") == "train" and r.get("lr") is not None]
    return [r["step"] for r in recs], [r["lr"] for r in recs]


def draw_plan_heatmap(records: list[dict], lr: tuple[list[int], list[float]], end_step: int, title: str, plt):
    """The heat map of one run's plan (``None`` when there is nothing to draw); returned unsaved.

    Args:
        records: the run's ``plan`` lines (``plan_records``).
        lr: ``(steps, learning rates)`` of its schedule (``train`` lines).
        end_step: the run's last step (the last plan holds until there).
        title: the figure's title.
        plt: ``matplotlib.pyplot``.
    """
    import numpy as np
    from matplotlib.colors import LogNorm

    names = shown_parameters(records)
    states = list(dict.fromkeys(s for n in names for s in records[0]["codecs"].get(n, {})))
    if not names or not states:
        return None
    edges = [r["step"] for r in records] + [max(end_step, records[-1]["step"] + 1)]
    heights = [1.3] + [max(1.2, 0.22 * len(names))] * len(states)
    fig, axes = plt.subplots(1 + len(states), 1, figsize=(10, sum(heights) + 1.0), sharex=True,
                             gridspec_kw={"height_ratios": heights})  # fmt: skip
    axes[0].plot(*lr, color="black", linewidth=1.2)
    for r in records:
        if r.get("reason") == "change":
            axes[0].axvline(r["step"], color="#D55E00", linestyle=":", linewidth=1)
    axes[0].set_ylabel("lr", fontsize=8)
    axes[0].set_title(title + "  (dotted: re-plans)", fontsize=9)
    norm, mesh = LogNorm(vmin=0.25, vmax=32), None
    for ax, state in zip(axes[1:], states):
        values = np.array([[r["bits"].get(n, {}).get(state, np.nan) for r in records] for n in names], dtype=float)
        mesh = ax.pcolormesh(edges, np.arange(len(names) + 1), values, cmap="viridis", norm=norm, shading="flat")
        ax.set_yticks(np.arange(len(names)) + 0.5)
        ax.set_yticklabels([n.removeprefix("transformer.").removesuffix(".weight") for n in names], fontsize=6)
        ax.invert_yaxis()
        ax.set_ylabel(f"{STATE_SHORT.get(state, state)} ({state})", fontsize=8)
    axes[-1].set_xlabel("step")
    # space for the colour bar is taken from every panel, so the lr panel keeps the heat maps' step axis
    bar = fig.colorbar(mesh, ax=list(axes), ticks=[0.25, 0.5, 1, 2, 4, 8, 16, 32], fraction=0.03)
    bar.ax.set_yticklabels(["0.25", "0.5", "1", "2", "4", "8", "16", "32"])
    bar.set_label("bits per parameter element", fontsize=8)
    return fig


def _mean_sd(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    return f"{statistics.mean(values):.3g}" + (f" ± {statistics.stdev(values):.2g}" if len(values) > 1 else "")


def plan_rows(out: Path, runs: list[dict]) -> list[dict]:
    """One row per (optimizer, settings) group with a logged plan: label, budget, final plan, transitions, overhead,
    the first finished seed's run id and its plan records."""
    rows = []
    for g in group_runs(runs):
        first = _first_run(out, g)
        if first is None:
            continue
        run, records = first
        last = records[-1]
        rows.append({"group": g, "label": g.label, "run": run, "records": records, "names": shown_parameters(records),
                     "budget_bytes": last.get("budget_bytes"), "planned_bytes": last.get("planned_bytes"),
                     "allocator": last.get("allocator"), "state_bytes": last.get("state_bytes"),
                     "transitions": _mean_sd([r.get("plan_transitions") for r in g.ok]),
                     "overhead": _mean_sd([100 * r["monitor_overhead"] for r in g.ok if r.get("monitor_overhead") is not None]),
                     "final": codec_counts(last, shown_parameters(records))})  # fmt: skip
    return rows


def plan_figure(out: Path, row: dict, plt) -> Path | None:
    """Write the heat map of ``row`` (a ``plan_rows`` row) as ``out/plan_<label>.png``; its path, or ``None``."""
    run = row["run"]
    fig = draw_plan_heatmap(row["records"], _lr_curve(out / run["run_id"]), run.get("target_steps") or run["steps"],
                            f"{row['label']} (seed {run['seed']})", plt)  # fmt: skip
    if fig is None:
        return None
    path = out / f"plan_{slug(row['label'])}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plan_section(out: Path, runs: list[dict], inline: int = INLINE_FIGURES) -> str | None:
    """report.md's plan section (``None`` when no run logged a plan); writes the heat maps (with matplotlib).

    Args:
        out: the run folder.
        runs: the summary's runs.
        inline: the heat maps are shown in the report when there are at most this many, else only linked
            (default 6; a suite's own sections show the ones it discusses).
    """
    from ..analysis.plots import pyplot

    rows = plan_rows(out, runs)
    if not rows:
        return None
    plt = pyplot()
    lines = ["## Optimizer-state plans", "",
             "Which codec stored each state (m, v) of each parameter: the final plan of the first seed as codec counts "
             "over the parameters with a choice (tensors under 4,096 elements keep fp32 and are not counted); "
             "codec changes made by the policy and the monitoring overhead (time of the steps that measured errors "
             "or changed codecs, above the run's median step, as a share of all step time) as mean ± std over seeds.",
             "", "| optimizer | allocator | budget B | final plan B | state B | codec changes | monitoring % | final plan | heat map |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    figures = []
    for row in rows:  # a heat map for plans a policy chose (a static plan is one colour per row: the table says it)
        path = plan_figure(out, row, plt) if plt is not None and row["allocator"] else None
        link = f"[png]({path.name})" if path else "-"
        if path:
            figures.append(path)

        def num(x):
            return "-" if x is None else f"{x:,}"

        policy = row["allocator"] is not None  # a budget policy: codec changes and monitoring apply
        lines.append(f"| {row['label']} | {row['allocator'] or 'static'} | {num(row['budget_bytes'])} | "
                     f"{num(row['planned_bytes'])} | {num(row['state_bytes'])} | {row['transitions'] if policy else '-'} | "
                     f"{row['overhead'] if policy else '-'} | {row['final']} | {link} |")  # fmt: skip
    lines.append("")
    if figures:
        lines += ["Heat maps (linked above): layers x steps, colour = bits per parameter element of each state, under "
                  "the learning-rate schedule with the re-plans marked.", ""]  # fmt: skip
        if len(figures) <= inline:
            lines += [f"![{p.stem}]({p.name})" for p in figures] + [""]
    return "\n".join(lines)
