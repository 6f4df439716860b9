"""Tables and plots from a run folder: ``report.md``, ``loss_curves.png``, ``pareto.png``, ``step_time.png``.

Everything is rebuilt from the files the runner wrote (``plan.json``, ``*/result.json``,
``*/metrics.jsonl``), so ``effopt report OUT`` works on a finished, interrupted or copied folder.
Rows are grouped by (optimizer spec, settings); ratios are against ``adamw`` in the same settings
(``adam`` when there is no ``adamw``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .metrics import MetricsLog, mean_std
from .runner import collect_summary, load_plan

BASELINES = ("adamw", "adam")


@dataclass
class Group:
    """The runs of one optimizer spec in one setting, with mean/std of the summary fields."""

    optimizer: str
    settings: str
    rows: list[dict]

    @property
    def ok(self) -> list[dict]:
        return [r for r in self.rows if not r["diverged"]]

    def stat(self, key: str) -> tuple[float | None, float | None]:
        return mean_std([r[key] for r in self.ok if r.get(key) is not None])

    @property
    def label(self) -> str:
        return self.optimizer if self.settings == "default" else f"{self.optimizer} [{self.settings}]"


def group_runs(runs: list[dict]) -> list[Group]:
    """Rows grouped by (optimizer, settings), in first-seen order."""
    groups: dict[tuple[str, str], Group] = {}
    for r in runs:
        key = (r["optimizer"], r.get("settings", "default"))
        groups.setdefault(key, Group(key[0], key[1], [])).rows.append(r)
    return list(groups.values())


def baseline_for(group: Group, groups: list[Group]) -> Group | None:
    """The AdamW (or Adam) group of the same settings, if it ran and did not diverge in every seed."""
    for name in BASELINES:
        for g in groups:
            if g.optimizer == name and g.settings == group.settings and g.ok:
                return g
    return None


def ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base not in (None, 0) else None


def _fmt(value, spec: str = ".4f", none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def _mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f}"


def table_rows(groups: list[Group]) -> list[dict]:
    """One dict of display-ready numbers per group (used by the terminal table and report.md)."""
    out = []
    for g in groups:
        base = baseline_for(g, groups)
        val, val_sd = g.stat("final_val_loss")
        ppl, _ = g.stat("val_ppl")
        sbytes, _ = g.stat("state_bytes")
        step, step_sd = g.stat("step_time_ms")
        row = {
            "label": g.label, "seeds": len(g.rows), "diverged": len(g.rows) - len(g.ok),
            "val_loss": val, "val_loss_std": val_sd, "val_ppl": ppl,
            "train_loss": g.stat("final_train_loss")[0],
            "state_bytes": sbytes, "bytes_per_param": g.stat("state_bytes_per_param")[0],
            "peak_memory_bytes": g.stat("peak_memory_bytes")[0],
            "step_time_ms": step, "step_time_std": step_sd,
            "optimizer_step_time_ms": g.stat("optimizer_step_time_ms")[0],
            "tokens_per_s": g.stat("tokens_per_s")[0], "steps_to_target": g.stat("steps_to_target")[0],
            "val_loss_gap": None, "val_ppl_gap": None, "state_ratio": None, "step_time_ratio": None,
        }  # fmt: skip
        if base is not None:
            bval, bppl, bstate, bstep = (base.stat(k)[0] for k in ("final_val_loss", "val_ppl", "state_bytes", "step_time_ms"))
            row["val_loss_gap"] = None if val is None else (val / bval - 1) * 100
            row["val_ppl_gap"] = None if ppl is None else (ppl / bppl - 1) * 100
            row["state_ratio"] = ratio(bstate, sbytes)
            row["step_time_ratio"] = ratio(step, bstep)
        out.append(row)
    return out


def terminal_table(runs: list[dict]) -> str:
    """The table ``effopt bench`` prints: one line per optimizer, mean +- std over seeds."""
    rows = table_rows(group_runs(runs))
    width = max([len(r["label"]) for r in rows] + [9])
    head = (f"{'optimizer':{width}s} {'seeds':>5s} {'val loss (mean +- std)':>22s} {'vs AdamW':>9s} "
            f"{'state MiB':>9s} {'B/param':>7s} {'x smaller':>9s} {'step ms':>8s} {'x AdamW':>7s}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        val = "diverged" if r["val_loss"] is None else f"{r['val_loss']:.4f} +- {r['val_loss_std']:.4f}"
        seeds = f"{r['seeds'] - r['diverged']}/{r['seeds']}" if r["diverged"] else str(r["seeds"])
        lines.append(
            f"{r['label']:{width}s} {seeds:>5s} {val:>22s} {_fmt(r['val_loss_gap'], '+8.2f') + '%' if r['val_loss_gap'] is not None else 'n/a':>9s} "
            f"{_mib(r['state_bytes']):>9s} {_fmt(r['bytes_per_param'], '.3f'):>7s} {_fmt(r['state_ratio'], '.2f'):>9s} "
            f"{_fmt(r['step_time_ms'], '.1f'):>8s} {_fmt(r['step_time_ratio'], '.2f'):>7s}"
        )  # fmt: skip
    return "\n".join(lines)


def markdown_table(runs: list[dict]) -> str:
    rows = table_rows(group_runs(runs))
    lines = [
        "| optimizer | seeds ok | final val loss | vs AdamW | val ppl | train loss | state bytes | B/param | "
        "x smaller state | peak memory MiB | step ms | x AdamW time | opt step ms | tokens/s | steps to target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        val = "diverged" if r["val_loss"] is None else f"{r['val_loss']:.4f} ± {r['val_loss_std']:.4f}"
        gap = "n/a" if r["val_loss_gap"] is None else f"{r['val_loss_gap']:+.2f}%"
        lines.append(
            f"| {r['label']} | {r['seeds'] - r['diverged']}/{r['seeds']} | {val} | {gap} | {_fmt(r['val_ppl'], '.3f')} | "
            f"{_fmt(r['train_loss'])} | {_fmt(r['state_bytes'], ',.0f')} | {_fmt(r['bytes_per_param'], '.3f')} | "
            f"{_fmt(r['state_ratio'], '.2f')} | {_mib(r['peak_memory_bytes'])} | {_fmt(r['step_time_ms'], '.1f')} | "
            f"{_fmt(r['step_time_ratio'], '.2f')} | {_fmt(r['optimizer_step_time_ms'], '.2f')} | "
            f"{_fmt(r['tokens_per_s'], ',.0f')} | {_fmt(r['steps_to_target'], '.0f')} |"
        )  # fmt: skip
    return "\n".join(lines)


def _curves(out: Path, group: Group, kind: str, key: str) -> tuple[list[int], list[float]]:
    """Mean over seeds of ``key`` at each logged step (steps every seed logged)."""
    per_seed = []
    for r in group.ok:
        recs = MetricsLog(out / r["run_id"] / "metrics.jsonl").read()
        per_seed.append({rec["step"]: rec[key] for rec in recs if rec.get("kind") == kind and rec.get(key) is not None})
    if not per_seed:
        return [], []
    steps = sorted(set.intersection(*(set(d) for d in per_seed)))
    return steps, [sum(d[s] for d in per_seed) / len(per_seed) for s in steps]


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated in (smaller x, smaller y), sorted by x."""
    front, best_y = [], math.inf
    for x, y in sorted(points):
        if y < best_y:
            front.append((x, y))
            best_y = y
    return front


def plot(out: Path, runs: list[dict]) -> list[Path]:
    """Write the three plots; returns their paths (none if matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    groups = group_runs(runs)
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for g in groups:
        steps, loss = _curves(out, g, "train", "train_loss")
        if steps:
            line = ax.plot(steps, loss, label=g.label)[0]
            esteps, vloss = _curves(out, g, "eval", "val_loss")
            if esteps:
                ax.plot(esteps, vloss, "o--", color=line.get_color(), markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (lines: train, dashed/dots: validation)")
    ax.set_title("Loss, mean over seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "loss_curves.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    pts = [(g.stat("state_bytes")[0], g.stat("val_ppl")[0], g.label) for g in groups if g.ok]
    pts = [p for p in pts if p[0] and p[1]]
    if pts:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for x, y, label in pts:
            ax.scatter([x / 2**20], [y])
            ax.annotate(label, (x / 2**20, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = pareto_front([(x, y) for x, y, _ in pts])
        ax.plot([x / 2**20 for x, _ in front], [y for _, y in front], "k--", linewidth=0.8, label="Pareto front")
        ax.set_xscale("log")
        ax.set_xlabel("optimizer state (MiB, log scale)")
        ax.set_ylabel("final validation perplexity")
        ax.set_title("Memory vs quality")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "pareto.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)

    timed = [(g.label, *g.stat("step_time_ms")) for g in groups if g.stat("step_time_ms")[0]]
    if timed:
        fig, ax = plt.subplots(figsize=(7, 0.4 * len(timed) + 1.5))
        ax.barh([t[0] for t in timed], [t[1] for t in timed], xerr=[t[2] for t in timed])
        ax.set_xlabel("median step time (ms), forward + backward + optimizer")
        ax.invert_yaxis()
        fig.tight_layout()
        paths.append(out / "step_time.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def build_report(out: Path, title: str | None = None, extra_sections: list[str] = ()) -> Path:
    """Write ``out/report.md`` (and the plots) from the run folder; returns the report's path."""
    summary = collect_summary(out, load_plan(out), json.loads((out / "summary.json").read_text()).get("command")
                              if (out / "summary.json").is_file() else None)  # fmt: skip
    runs = summary["runs"]
    plots = plot(out, runs)
    first = runs[0] if runs else {}
    lines = [f"# {title or 'Optimizer comparison'}", ""]
    if summary.get("command"):
        lines += ["Command:", "", f"    {summary['command']}", ""]
    if first:
        lines += [f"Model `{first['model']}`, data `{first['data']}`, {first['target_steps']} steps, device "
                  f"`{first['device']}`, torch {first['torch']}. Mean ± std over seeds; gaps and ratios against "
                  "AdamW in the same settings. Step time is the median of steps after warm-up "
                  "(forward + backward + optimizer). Peak memory: "
                  + ("CUDA allocator peak." if first["peak_memory_kind"] == "cuda_allocator"
                     else "exact bytes of parameters + gradients + optimizer states (process peak RSS is in summary.json)."),
                  ""]  # fmt: skip
    lines += [markdown_table(runs), ""]
    if summary["errors"]:
        lines += ["## Failed runs", ""] + [f"- `{e['run']}`: {e['error']}" for e in summary["errors"]] + [""]
    if summary["pending"]:
        lines += ["## Not run yet", "", "Resume with `--resume`: " + ", ".join(f"`{p}`" for p in summary["pending"]), ""]
    lines += list(extra_sections)
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
