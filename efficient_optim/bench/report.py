"""Tables and text from a run folder: ``report.md`` (plots: ``report_plots``), and the terminal table.

Everything is rebuilt from the files the runner wrote (``plan.json``, ``*/result.json``,
``*/metrics.jsonl``), so ``effopt report OUT`` works on a finished, interrupted or copied folder.
Rows are grouped by (optimizer spec, settings); ratios are against ``adamw`` in the same settings
(``adam`` when there is no ``adamw``).

What the report claims is limited by what was measured: a standard deviation is shown only over two or more
seeds, a gap is called within or beyond the seed spread only when both sides have two or more seeds (one
seed: the spread is unknown, the result a hint), and step times measured while the machine was loaded are
flagged as not comparable.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from .metrics import LOAD_MARGIN, MetricsLog, mean_std
from .runner import collect_summary, load_plan

BASELINES = ("adamw", "adam")
SPREAD_SE = 2.0  # a gap is "beyond the seed spread" when larger than this many standard errors of the difference
SMALL_MODEL_PARAMS = 10_000_000  # below this, shared tables and small dense tensors weigh on B/param
ONE_SEED = ("one seed: the seed-to-seed spread is unknown here, so a difference between optimizers is a hint, "
            "not a finding (run 2 or more seeds, e.g. --seeds 3)")  # fmt: skip


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
        """Mean and sample std of ``key`` over the finished seeds (std 0 for one seed: see ``spread``)."""
        return mean_std([r[key] for r in self.ok if r.get(key) is not None])

    def spread(self, key: str) -> float | None:
        """Sample std of ``key`` over finished seeds; ``None`` with fewer than two (the spread is unknown)."""
        values = [r[key] for r in self.ok if r.get(key) is not None]
        return statistics.stdev(values) if len(values) > 1 else None

    @property
    def label(self) -> str:
        return self.optimizer if self.settings == "default" else f"{self.optimizer} [{self.settings}]"

    @property
    def timing_loaded(self) -> bool:
        """Whether any seed's step times were measured on a loaded machine (``metrics.load_summary``)."""
        return any(r.get("timing_loaded") for r in self.ok)

    def step_time_iqr(self) -> tuple[float | None, float | None]:
        """Lowest first and highest third quartile of step time (ms) over the seeds: the spread of the bars."""
        q1 = [r["step_time_q1_ms"] for r in self.ok if r.get("step_time_q1_ms") is not None]
        q3 = [r["step_time_q3_ms"] for r in self.ok if r.get("step_time_q3_ms") is not None]
        return (min(q1) if q1 else None), (max(q3) if q3 else None)


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


def seed_spread(g: Group, base: Group, key: str = "final_val_loss") -> str:
    """``"unknown"`` (a side has < 2 seeds), ``"within"`` or ``"beyond"`` the seed spread measured here.

    A gap is beyond the spread when ``|mean_g - mean_base| > SPREAD_SE * sqrt(sd_g²/n_g + sd_base²/n_base)``
    (about a two-sided 95 % test); ``"baseline"`` for the baseline itself.
    """
    if g is base:
        return "baseline"
    sd_g, sd_b = g.spread(key), base.spread(key)
    if sd_g is None or sd_b is None:
        return "unknown"
    n_g = sum(1 for r in g.ok if r.get(key) is not None)
    n_b = sum(1 for r in base.ok if r.get(key) is not None)
    se = math.sqrt(sd_g**2 / n_g + sd_b**2 / n_b)
    return "within" if abs(g.stat(key)[0] - base.stat(key)[0]) <= SPREAD_SE * se else "beyond"


def steps_to_target(out: Path, g: Group, target: float) -> float | None:
    """Mean over seeds of the first evaluated step at or below ``target`` perplexity (``None`` if a seed never)."""
    steps = []
    for r in g.ok:
        recs = MetricsLog(out / r["run_id"] / "metrics.jsonl").read()
        hit = [rec["step"] for rec in recs if rec.get("kind") == "eval" and rec["val_ppl"] <= target]
        if not hit:
            return None
        steps.append(min(hit))
    return statistics.mean(steps) if steps else None


def _fmt(value, spec: str = ".4f", none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def _mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f}"


def table_rows(groups: list[Group], out: Path | None = None, target_ppl: float | None = None) -> list[dict]:
    """One dict of display-ready numbers per group (used by the terminal table and report.md).

    Args:
        groups: ``group_runs`` of the summary's runs.
        out: the run folder (to read evaluations for ``target_ppl``); ``None``: use the runs' own
            ``steps_to_target``.
        target_ppl: the perplexity ``steps_to_target`` is measured against (default: the runs' ``target_ppl``).
    """
    out_rows = []
    for g in groups:
        base = baseline_for(g, groups)
        val, _ = g.stat("final_val_loss")
        ppl, _ = g.stat("val_ppl")
        sbytes, _ = g.stat("state_bytes")
        step, _ = g.stat("step_time_ms")
        q1, q3 = g.step_time_iqr()
        row = {
            "label": g.label, "seeds": len(g.rows), "diverged": len(g.rows) - len(g.ok), "ok": len(g.ok),
            "val_loss": val, "val_loss_std": g.spread("final_val_loss"), "val_ppl": ppl,
            "train_loss": g.stat("final_train_loss")[0],
            "test_loss": g.stat("test_loss")[0], "test_loss_std": g.spread("test_loss"), "test_ppl": g.stat("test_ppl")[0],
            "state_bytes": sbytes, "bytes_per_param": g.stat("state_bytes_per_param")[0],
            "peak_memory_bytes": g.stat("peak_memory_bytes")[0],
            "step_time_ms": step, "step_time_q1_ms": q1, "step_time_q3_ms": q3, "timing_loaded": g.timing_loaded,
            "optimizer_step_time_ms": g.stat("optimizer_step_time_ms")[0],
            "tokens_per_s": g.stat("tokens_per_s")[0], "steps_to_target": _steps_to_target(g, out, target_ppl),
            "sharpness": g.stat("sharpness")[0],
            "val_loss_gap": None, "val_ppl_gap": None, "state_ratio": None, "step_time_ratio": None, "spread": None,
        }  # fmt: skip
        if base is not None:
            bval, bppl, bstate, bstep = (base.stat(k)[0] for k in ("final_val_loss", "val_ppl", "state_bytes", "step_time_ms"))
            row["val_loss_gap"] = None if val is None else (val / bval - 1) * 100
            row["val_ppl_gap"] = None if ppl is None else (ppl / bppl - 1) * 100
            row["state_ratio"] = ratio(bstate, sbytes)
            row["step_time_ratio"] = ratio(step, bstep)
            row["spread"] = seed_spread(g, base) if val is not None else None
            row["timing_loaded"] = g.timing_loaded or base.timing_loaded
        out_rows.append(row)
    return out_rows


def _steps_to_target(g: Group, out: Path | None, target: float | None) -> float | str | None:
    """Mean steps to the target over seeds, ``"never"`` if a seed did not reach it, ``None`` with no target."""
    if target is not None and out is not None:
        steps = steps_to_target(out, g, target)
        return "never" if steps is None and g.ok else steps
    if not any(r.get("target_ppl") for r in g.ok):
        return None
    if any(r.get("steps_to_target") is None for r in g.ok):
        return "never"
    return statistics.mean(r["steps_to_target"] for r in g.ok)


def target_of(runs: list[dict], target_ppl: float | None = None) -> float | None:
    """The perplexity target the table's steps-to-target column measures (``None``: no column)."""
    if target_ppl is not None:
        return target_ppl
    targets = {r.get("target_ppl") for r in runs if r.get("target_ppl")}
    return targets.pop() if len(targets) == 1 else None


def _val_text(r: dict, pm: str) -> str:
    """Mean validation loss, with ``± std`` only over two or more seeds."""
    if r["val_loss"] is None:
        return "diverged"
    return f"{r['val_loss']:.4f}" + (f" {pm} {r['val_loss_std']:.4f}" if r["val_loss_std"] is not None else "")


def _test_text(r: dict, pm: str) -> str:
    """Mean test loss, with ``± std`` only over two or more seeds (``n/a`` without a test split)."""
    if r["test_loss"] is None:
        return "n/a" if r["val_loss"] is not None else "diverged"
    return f"{r['test_loss']:.4f}" + (f" {pm} {r['test_loss_std']:.4f}" if r["test_loss_std"] is not None else "")


def _has_test(rows: list[dict]) -> bool:
    return any(r["test_loss"] is not None for r in rows)


def _spread_text(r: dict) -> str:
    return {"unknown": "unknown (1 seed)", "within": "within", "beyond": "beyond", "baseline": "-"}.get(r["spread"], "n/a")


def _step_text(r: dict) -> str:
    return _fmt(r["step_time_ms"], ".1f") + ("*" if r["timing_loaded"] else "")


def notes(runs: list[dict], rows: list[dict]) -> list[str]:
    """What a reader must know to read the table: seed caveat, timing comparability, bytes/param on small models."""
    out = []
    single = [r["label"] for r in rows if r["ok"] == 1]
    if single and len(single) == len(rows):
        out.append(f"Seeds: {ONE_SEED}.")
    elif single:
        out.append(f"Seeds: {', '.join(single)} finished with {ONE_SEED}.")
    if any(r["ok"] > 1 for r in rows):
        out.append(f"Values are means over seeds, ± the sample standard deviation. A gap to AdamW is 'within' the seed "
                   f"spread measured here when it is at most {SPREAD_SE:g} standard errors of the difference of the "
                   "means (sqrt(sd1²/n1 + sd2²/n2)); 'beyond' otherwise.")  # fmt: skip
    fractions = sorted({r.get("test_fraction") for r in runs if r.get("test_loss") is not None})
    if fractions:
        out.append(f"Test loss and perplexity: the held-out test split ({', '.join(f'{f:.0%}' for f in fractions)} of the "
                   "data, apart from the validation split), evaluated once at the end of each run and never used "
                   "for a decision; validation loss is what targets and comparisons here are judged on.")  # fmt: skip
    out += _timing_notes(runs)
    small = [r for r in runs if r.get("num_params") and r["num_params"] < SMALL_MODEL_PARAMS]
    if small and any((r.get("state_bytes_per_param") or 8) < 7.9 for r in small):
        out.append(f"B/param on this {small[0]['num_params'] / 1e6:.2f}M-parameter model is higher than on large "
                   "ones: a quantized optimizer's shared lookup tables (encoder/decoder maps, ~69 KB for QAdamW) and "
                   "the tensors it keeps dense (fewer than 4,096 elements: biases, norms, in fp32) weigh more here; "
                   "on large matrices QAdamW 8-bit stores 2.02 B/param and 4-bit 1.03 (BENCHMARKS.md).")  # fmt: skip
    return out


def _timing_notes(runs: list[dict]) -> list[str]:
    """How loaded the machine was while the step times were measured."""
    ok = [r for r in runs if not r["diverged"]]
    loads = [x for r in ok for x in (r.get("load_avg_start"), r.get("load_avg_end")) if x is not None]
    if not loads:
        return ["Machine load was not recorded for these runs: step times may not be comparable."]
    cores = max(r.get("cpu_cores") or 0 for r in ok)
    text = (f"Step time: median over the steps after warm-up (forward + backward + optimizer); the step-time plot's "
            f"whiskers are the interquartile range over steps. Machine load (1-minute average) during the runs: "
            f"{min(loads):.2f}–{max(loads):.2f} on {cores} cores.")  # fmt: skip
    loaded = sorted({r["optimizer"] for r in ok if r.get("timing_loaded")})
    if loaded:
        text += (f" * Timing not comparable: runs of {', '.join(loaded)} (and ratios against them) were measured "
                 f"while the load exceeded the cores by more than {LOAD_MARGIN}: other work competed for the CPU. "
                 "Rerun on an idle machine before reading speed from this table.")  # fmt: skip
    return [text]


def terminal_table(runs: list[dict]) -> str:
    """The table ``effopt bench`` prints: one line per optimizer, then the notes that qualify it."""
    rows = table_rows(group_runs(runs))
    width = max([len(r["label"]) for r in rows] + [9])
    test = _has_test(rows)
    head = (f"{'optimizer':{width}s} {'seeds':>5s} {'val loss':>17s} {'vs AdamW':>9s} {'seed spread':>16s} "
            + (f"{'test loss':>17s} {'test ppl':>9s} " if test else "")
            + f"{'state MiB':>9s} {'B/param':>7s} {'x smaller':>9s} {'step ms':>8s} {'x AdamW':>7s}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        seeds = f"{r['ok']}/{r['seeds']}" if r["diverged"] else str(r["seeds"])
        gap = "n/a" if r["val_loss_gap"] is None else f"{r['val_loss_gap']:+.2f}%"
        lines.append(
            f"{r['label']:{width}s} {seeds:>5s} {_val_text(r, '+-'):>17s} {gap:>9s} {_spread_text(r):>16s} "
            + (f"{_test_text(r, '+-'):>17s} {_fmt(r['test_ppl'], '.3f'):>9s} " if test else "")
            + f"{_mib(r['state_bytes']):>9s} {_fmt(r['bytes_per_param'], '.3f'):>7s} {_fmt(r['state_ratio'], '.2f'):>9s} "
            f"{_step_text(r):>8s} {_fmt(r['step_time_ratio'], '.2f'):>7s}"
        )  # fmt: skip
    return "\n".join(lines + [""] + [f"note: {n}" for n in notes(runs, rows)])


def markdown_table(runs: list[dict], out: Path | None = None, target_ppl: float | None = None) -> str:
    """report.md's table; a steps-to-target column only when there is a target (see ``table_rows``)."""
    target = target_of(runs, target_ppl)
    rows = table_rows(group_runs(runs), out, target)
    test = _has_test(rows)
    cols = ["optimizer", "seeds ok", "final val loss", "vs AdamW", "vs seed spread", "val ppl",
            *(("test loss", "test ppl") if test else ()), "train loss",
            "state bytes", "B/param", "x smaller state", "peak memory MiB", "step ms (median)", "step ms IQR",
            "x AdamW time", "opt step ms", "tokens/s"]  # fmt: skip
    if any(r["sharpness"] is not None for r in rows):
        cols.append("sharpness")
    if target is not None:
        cols.append(f"steps to val ppl ≤ {target:.3f}")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        gap = "n/a" if r["val_loss_gap"] is None else f"{r['val_loss_gap']:+.2f}%"
        iqr = "n/a" if r["step_time_q1_ms"] is None else f"{r['step_time_q1_ms']:.1f}–{r['step_time_q3_ms']:.1f}"
        cells = [r["label"], f"{r['ok']}/{r['seeds']}", _val_text(r, "±"), gap, _spread_text(r), _fmt(r["val_ppl"], ".3f"),
                 *((_test_text(r, "±"), _fmt(r["test_ppl"], ".3f")) if test else ()), _fmt(r["train_loss"]), _fmt(r["state_bytes"], ",.0f"), _fmt(r["bytes_per_param"], ".3f"),
                 _fmt(r["state_ratio"], ".2f"), _mib(r["peak_memory_bytes"]), _step_text(r), iqr,
                 _fmt(r["step_time_ratio"], ".2f"), _fmt(r["optimizer_step_time_ms"], ".2f"), _fmt(r["tokens_per_s"], ",.0f")]  # fmt: skip
        if "sharpness" in cols:
            cells.append(_fmt(r["sharpness"], ".3g"))
        if target is not None:
            cells.append(r["steps_to_target"] if isinstance(r["steps_to_target"], str) else _fmt(r["steps_to_target"], ".0f"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated in (smaller x, smaller y), sorted by x."""
    front, best_y = [], math.inf
    for x, y in sorted(points):
        if y < best_y:
            front.append((x, y))
            best_y = y
    return front


def _intro(first: dict) -> str:
    peak = ("CUDA allocator peak." if first["peak_memory_kind"] == "cuda_allocator"
            else "exact bytes of parameters + gradients + optimizer states (process peak RSS is in summary.json).")  # fmt: skip
    return (f"Model `{first['model']}`, data `{first['data']}`, {first['target_steps']} steps, device `{first['device']}`, "
            f"torch {first['torch']}. Gaps and ratios against AdamW in the same settings. Peak memory: {peak}")  # fmt: skip


def build_report(out: Path, title: str | None = None, extra_sections: list[str] = (), target_ppl: float | None = None) -> Path:
    """Write ``out/report.md`` (and the plots) from the run folder; returns the report's path.

    Args:
        out: the run folder.
        title: the report's heading (default "Optimizer comparison").
        extra_sections: markdown appended after the table (a suite's verdicts).
        target_ppl: perplexity for the table's steps-to-target column (default: the runs' ``target_ppl``).
    """
    from .plan_report import plan_section
    from .report_plots import plot

    summary = collect_summary(out, load_plan(out), json.loads((out / "summary.json").read_text()).get("command")
                              if (out / "summary.json").is_file() else None)  # fmt: skip
    runs = summary["runs"]
    plots = plot(out, runs)
    lines = [f"# {title or 'Optimizer comparison'}", ""]
    if summary.get("command"):
        lines += ["Command:", "", f"    {summary['command']}", ""]
    if runs:
        lines += [_intro(runs[0]), ""]
    lines += [markdown_table(runs, out, target_ppl), ""]
    if runs:
        lines += [f"- {n}" for n in notes(runs, table_rows(group_runs(runs)))] + [""]
    if summary["errors"]:
        lines += ["## Failed runs", ""] + [f"- `{e['run']}`: {e['error']}" for e in summary["errors"]] + [""]
    if summary["pending"]:
        lines += ["## Not run yet", "", "Resume with `--resume`: " + ", ".join(f"`{p}`" for p in summary["pending"]), ""]
    lines += list(extra_sections)
    plans = plan_section(out, runs)  # runs whose optimizer logged its plan (bench.plan_log)
    if plans:
        lines += [plans]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
