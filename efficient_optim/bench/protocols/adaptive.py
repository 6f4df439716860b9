"""Per-layer adaptive precision under a hard memory budget (protocol P4): ``effopt suite adaptive``.

On a small GPT-2 LM and the digits CNN, 3 seeds each: fp32 AdamW, uniform 8-bit and 4-bit QAdamW and HybridAdam,
and QAdamW under ``policy.Budget`` with each allocator (the fixed depth/type rule, the data-driven knapsack and the
dynamic re-planner) at (a) the state bytes of uniform 4-bit and (b) those of HybridAdam, both measured exactly on
the model before the runs are planned (the optimizer built and stepped once); then a grid of bytes per parameter
(``--grid``, ``--grid-seeds`` seeds) to find the smallest budget at which each allocator stays within 0.5 % of fp32
AdamW's validation loss. Every run logs its plan (``bench.plan_log``). When HybridAdam's bytes leave no state room
above its cheapest codec, every allocator makes the same plan: that budget is run once, with the fixed rule.

Verdicts (mean ± std over seeds), per model:

- same memory, better convergence: at uniform 4-bit's bytes, the best allocator's val loss is below uniform
  4-bit's by more than the seed spread;
- less memory, same convergence: an allocator matches uniform 8-bit's val loss (within the seed spread, or
  lower) with at most 60 % of its state bytes;
- which layers get the bits (sentences from the final plans), the smallest budget within 0.5 % of fp32 AdamW,
  the budget never exceeded at any logged step, and the monitoring overhead (steps that measured errors or
  changed codecs, above the run's median step; target <= 3 % of the step on the LM).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .. import adaptive_analysis as aa
from ..config import MAIN_JOB_WARMUP, RunConfig, slug
from ..options import UsageError
from ..plan_log import PlanLogCallback
from ..plan_report import plan_records
from ..report import Group, group_runs, seed_spread
from ..runner import plan_matrix
from .base import INDICATIVE, MET, NOT_MEASURABLE, NOT_MET, Protocol, Verdict, find_group

CNN = {"model": "digits-cnn", "batch_size": 64, "context": None, "layers": None, "width": None, "heads": None}
MODELS = (("lm", "LM", {}), ("cnn", "CNN", CNN))
BASELINES = ("adamw", "qadamw8", "qadamw4", "hybrid_adam")
ALLOCATORS = ("fixed", "data", "dynamic")
GRID, QUICK_GRID = (1.5, 2.5, 4.0), (2.5,)
WITHIN_FP32 = 0.005  # the smallest budget "within 0.5 % of fp32 AdamW"
LESS_MEMORY = 0.6  # "less memory": at most 60 % of uniform 8-bit's state bytes
OVERHEAD_TARGET = 0.03
ROLE_WORDS = {"4bit": "uniform 4-bit's bytes", "hybrid": "HybridAdam's bytes", "grid": "grid"}


def budget_spec(size: str, allocator: str, steps: int) -> str:
    """QAdamW under a budget (``size``: ``budget_bytes=N`` or ``budget_bpp=X``), the allocator's schedule scaled to
    the run: first measurement after ``steps // 15`` steps (20 of 300, ``Budget``'s default), re-plans every
    ``steps // 6`` (50 of 300), patience 2."""
    return f"qadamw+{size}+allocator={allocator}+warmup={max(2, steps // 15)}+every={max(2, steps // 6)}+patience=2"


class AdaptivePrecision(Protocol):
    """Budgets at uniform 4-bit's and HybridAdam's bytes, three allocators, against the uniform codecs and fp32."""

    name = "adaptive"
    aliases = ("p4",)
    protocol_id = "P4"
    title = "Per-layer adaptive precision under a memory budget (P4)"
    # a small LM so that 72 runs fit in minutes; the main job's lr and warm-up (with 15 warm-up steps fp32 AdamW's
    # seeds spread 2.46-2.59 in val loss on this model, with 75: 2.43-2.48)
    defaults = RunConfig(steps=300, width=64, heads=4, context=32, batch_size=16, lr=3e-3, warmup_steps=MAIN_JOB_WARMUP)
    quick_steps = 12
    seeds = 3

    def __init__(self):
        self.grid: tuple[float, ...] | None = None
        self.grid_seeds = 1

    def add_options(self, ap) -> None:
        ap.add_argument("--grid", default=None, help="budgets in bytes per parameter for the smallest budget within 0.5%% "
                        f"of fp32 AdamW, comma-separated (default {','.join(map(str, GRID))}; --quick: {QUICK_GRID[0]})")  # fmt: skip
        ap.add_argument("--grid-seeds", type=int, default=1, help="seeds of each grid point (default 1)")

    def configure(self, args) -> None:
        grid = getattr(args, "grid", None)
        if grid:
            try:
                values = tuple(float(x) for x in grid.split(",") if x.strip())
            except ValueError:
                raise UsageError(f"--grid must be comma-separated numbers of bytes per parameter, got {grid!r}") from None
            if not values or any(v <= 0 for v in values):
                raise UsageError(f"--grid values must be > 0 bytes per parameter, got {grid!r}")
            self.grid = values
        seeds = getattr(args, "grid_seeds", 1)
        if seeds is None or seeds < 1:
            raise UsageError(f"--grid-seeds must be >= 1, got {seeds}")
        self.grid_seeds = seeds

    def callbacks(self, cfg):
        return [PlanLogCallback()]

    def plan(self, base, seeds, quick):
        plan, missing = [], []
        grid = self.grid or (QUICK_GRID if quick else GRID)
        if base.warmup_steps is not None and base.warmup_steps >= base.steps:  # a --quick run is shorter than the warm-up
            base = dataclasses.replace(base, warmup_steps=max(1, base.steps // 20))
        for label, words, over in MODELS:
            b = dataclasses.replace(base, **over)
            plan += plan_matrix(b, list(BASELINES), seeds, {label: {}})
            bytes4, bytes_h = aa.measure_state_bytes(b, "qadamw4"), aa.measure_state_bytes(b, "hybrid_adam")
            plan += plan_matrix(b, [budget_spec(f"budget_bytes={bytes4}", a, b.steps) for a in ALLOCATORS], seeds, {label: {}})
            floor, room = aa.budget_room(b, bytes_h)
            if bytes_h < floor:
                missing.append(Verdict("allocators at HybridAdam's bytes", words, f"{bytes_h:,} B", NOT_MEASURABLE,
                                       f"below the cheapest plan of the codec vocabulary ({floor:,} B)"))  # fmt: skip
            else:
                allocators = ALLOCATORS if room else ("fixed",)
                plan += plan_matrix(b, [budget_spec(f"budget_bytes={bytes_h}", a, b.steps) for a in allocators], seeds, {label: {}})
            plan += plan_matrix(b, [budget_spec(f"budget_bpp={x:g}", a, b.steps) for x in grid for a in ALLOCATORS],
                                self.grid_seeds, {label: {}})  # fmt: skip
        return plan, missing

    # ------------------------------------------------------------------------------------------- verdicts
    def verdicts(self, runs, out: Path, base: RunConfig):
        groups = group_runs(runs)
        v = []
        for label, words, _ in MODELS:
            ref, q8, q4, hy = (find_group(groups, s, label) for s in BASELINES)
            if ref is None or q8 is None or q4 is None:
                v.append(Verdict("all criteria", words, "n/a", NOT_MEASURABLE, "fp32 AdamW, uniform 8-bit or 4-bit has no finished run"))
                continue
            budget = aa.budget_runs(groups, label, q4.stat("state_bytes")[0], hy.stat("state_bytes")[0] if hy else None)
            v.append(_budget_kept(out, budget, words))
            v.append(_same_memory(budget, q4, words))
            v.append(_less_memory(budget, q8, words))
            v += [_smallest(budget, ref, a, words) for a in ALLOCATORS]
            v += [Verdict("which layers get the bits (final plans at uniform 4-bit's bytes; sentences below)",
                          f"{words}, {aa.ALLOCATOR_WORDS[r.allocator]}", aa.depth_summary(out, r), "measured")
                  for r in budget if r.role == "4bit"]  # fmt: skip
            v += _overhead(budget, words)
        return v

    def sections(self, runs, out: Path, base: RunConfig) -> list[str]:
        groups = group_runs(runs)
        parts = []
        for label, words, _ in MODELS:
            ref, q8, q4, hy = (find_group(groups, s, label) for s in BASELINES)
            if ref is None or q4 is None:
                continue
            budget = aa.budget_runs(groups, label, q4.stat("state_bytes")[0], hy.stat("state_bytes")[0] if hy else None)
            parts.append(_model_table(words, [g for g in (ref, q8, q4, hy) if g], budget, ref, q4))
            sentences = [s for r in budget if r.role in ("4bit", "hybrid") for s in aa.layer_sentences(out, r, words)]
            if sentences:
                parts.append(f"### Which layers get the bits ({words})\n\n" + "\n".join(f"- {s}" for s in sentences) + "\n")
            figures = [r for r in budget if r.role == "4bit" and plan_records(out / r.group.ok[0]["run_id"])] if budget else []
            if figures:
                parts.append(f"### Plans over time at uniform 4-bit's bytes ({words})\n\n"
                             + "\n".join(f"![{r.allocator}](plan_{slug(r.group.label)}.png)" for r in figures if r.group.ok) + "\n")  # fmt: skip
        return parts


# ------------------------------------------------------------------------------------------ criteria
def _loss(g: Group) -> str:
    return aa.mean_sd_text([r["final_val_loss"] for r in g.ok if r.get("final_val_loss") is not None])


def _describe(r: aa.BudgetRun) -> str:
    where = f"{r.bpp:g} B/param" if r.role == "grid" else ROLE_WORDS[r.role]
    return f"{'every allocator (no choice)' if r.shared else aa.ALLOCATOR_WORDS[r.allocator]} at {where}"


def _spread_verdict(verdict: str, spread: str, g: Group, ref: Group) -> tuple[str, str]:
    """The verdict and its reason given the seed spread (one seed on a side: indicative only)."""
    if spread == "unknown":
        return INDICATIVE, f"one seed: points to '{verdict}'; the seed spread is unknown"
    return verdict, f"gap {spread} the seed spread ({len(g.ok)} vs {len(ref.ok)} seeds)"


def _budget_kept(out: Path, budget: list[aa.BudgetRun], words: str) -> Verdict:
    """Every logged plan of every budget run within its budget (state bytes and the plan's own bytes)."""
    crit = "state bytes never above the budget (every logged step of every budget run)"
    over, lines = [], 0
    for r in budget:
        for row in r.group.rows:
            for rec in plan_records(out / row["run_id"]):
                lines += 1
                if rec.get("budget_bytes") is not None and max(rec["state_bytes"], rec.get("planned_bytes") or 0) > rec["budget_bytes"]:
                    over.append(f"{row['run_id']} step {rec['step']}")
    if not lines:
        return Verdict(crit, words, "n/a", NOT_MEASURABLE, "no budget run logged a plan")
    return Verdict(crit, words, f"{len(over)} of {lines} logged plans over", MET if not over else NOT_MET, ", ".join(over[:5]))


def _same_memory(budget: list[aa.BudgetRun], q4: Group, words: str) -> Verdict:
    crit = "same memory, better convergence: best allocator at uniform 4-bit's bytes below uniform 4-bit by more than the seed spread"
    at = [r for r in budget if r.role == "4bit" and r.group.ok]
    if not at:
        return Verdict(crit, words, "n/a", NOT_MEASURABLE, "no allocator run at uniform 4-bit's bytes finished")
    best = min(at, key=lambda r: r.group.stat("final_val_loss")[0])
    gap = best.group.stat("final_val_loss")[0] / q4.stat("final_val_loss")[0] - 1
    spread = seed_spread(best.group, q4)
    verdict, reason = _spread_verdict(MET if gap < 0 and spread == "beyond" else NOT_MET, spread, best.group, q4)
    measured = (f"{aa.ALLOCATOR_WORDS[best.allocator]}: {_loss(best.group)} vs uniform 4-bit {_loss(q4)} ({gap * 100:+.2f} %); "
                f"state {best.group.stat('state_bytes')[0]:,.0f} vs {q4.stat('state_bytes')[0]:,.0f} B")  # fmt: skip
    return Verdict(crit, words, measured, verdict, reason)


def _less_memory(budget: list[aa.BudgetRun], q8: Group, words: str) -> Verdict:
    crit = f"less memory, same convergence: an allocator matches uniform 8-bit's val loss at <= {LESS_MEMORY:.0%} of its state bytes"
    limit = LESS_MEMORY * q8.stat("state_bytes")[0]
    small = [r for r in budget if r.group.ok and r.group.stat("state_bytes")[0] <= limit]
    if not small:
        return Verdict(crit, words, f"no budget run at <= {limit:,.0f} B", NOT_MEASURABLE, "no finished run that small")
    q8_loss = q8.stat("final_val_loss")[0]

    def matches(r):
        return r.group.stat("final_val_loss")[0] <= q8_loss or seed_spread(r.group, q8) == "within"

    found = sorted((r for r in small if matches(r)), key=lambda r: (len(r.group.ok) < 2, r.group.stat("state_bytes")[0]))
    pick = found[0] if found else min(small, key=lambda r: r.group.stat("final_val_loss")[0])
    ratio = pick.group.stat("state_bytes")[0] / q8.stat("state_bytes")[0]
    gap = pick.group.stat("final_val_loss")[0] / q8_loss - 1
    measured = f"{_describe(pick)}: {_loss(pick.group)} vs uniform 8-bit {_loss(q8)} ({gap * 100:+.2f} %) at {ratio:.0%} of its bytes"
    verdict, reason = _spread_verdict(MET if found else NOT_MET, seed_spread(pick.group, q8), pick.group, q8)
    if verdict == MET and gap <= 0:
        reason = f"val loss at or below uniform 8-bit's; {reason}"
    if pick.shared:
        reason += "; at this budget no allocator had a choice: the plan is the cheapest one (4-bit m, factored v)"
    return Verdict(crit, words, measured, verdict, reason)


def _smallest(budget: list[aa.BudgetRun], ref: Group, allocator: str, words: str) -> Verdict:
    crit = f"smallest budget within {WITHIN_FP32:.1%} of fp32 AdamW's val loss"
    subject = f"{words}, {aa.ALLOCATOR_WORDS[allocator]}"
    runs = sorted((r for r in budget if (r.allocator == allocator or r.shared) and r.group.ok and r.budget),
                  key=lambda r: r.budget)  # fmt: skip
    if not runs:
        return Verdict(crit, subject, "n/a", NOT_MEASURABLE, "no finished budget run")
    base, numel = ref.stat("final_val_loss")[0], runs[0].group.ok[0]["num_params"]
    gaps = [(r, r.group.stat("final_val_loss")[0] / base - 1) for r in runs]
    hit = next(((r, g) for r, g in gaps if g <= WITHIN_FP32), None)
    tried = f"budgets tried (B/param): {', '.join(f'{r.budget / numel:.2f}' for r in runs)}; fp32 AdamW {_loss(ref)}"
    if hit is None:
        r, g = min(gaps, key=lambda x: x[1])
        return Verdict(crit, subject, f"none of the budgets tried; closest: {_describe(r)}, {g * 100:+.2f} %", "measured", tried)
    r, g = hit
    return Verdict(crit, subject, f"{r.budget:,} B ({r.budget / numel:.2f} B/param, {_describe(r)}): {g * 100:+.2f} %, "
                   f"{len(r.group.ok)} seed(s)", "measured", tried)  # fmt: skip


def _overhead(budget: list[aa.BudgetRun], words: str) -> list[Verdict]:
    """The dynamic and data-driven allocators' monitoring overhead at uniform 4-bit's bytes."""
    out = []
    for r in (r for r in budget if r.role == "4bit" and r.allocator in ("dynamic", "data")):
        values = [x["monitor_overhead"] for x in r.group.ok if x.get("monitor_overhead") is not None]
        crit = f"monitoring overhead of the {aa.ALLOCATOR_WORDS[r.allocator]} allocator (share of step time)"
        if not values:
            out.append(Verdict(crit, words, "n/a", NOT_MEASURABLE, "no timed run"))
            continue
        mean = sum(values) / len(values)
        text = aa.mean_sd_text([100 * x for x in values], ".2f") + " %"
        steps = aa.mean_sd_text([x["monitor_steps"] for x in r.group.ok if x.get("monitor_steps") is not None], ".1f")
        reason = f"{steps} monitored steps per run; measured within each run against its median step"
        if r.group.timing_loaded:
            reason += "; the machine was loaded (more work than cores), so single steps are noisy"
        verdict = (MET if mean <= OVERHEAD_TARGET else NOT_MET) if words == "LM" and r.allocator == "dynamic" else "measured"
        if verdict != "measured":
            crit += f", target <= {OVERHEAD_TARGET:.0%} (on the suite's LM; gpt2-mini: benchmarks/budget_overhead.py)"
        out.append(Verdict(crit, words, text, verdict, reason))
    return out


def _model_table(words: str, baselines: list[Group], budget: list[aa.BudgetRun], ref: Group, q4: Group) -> str:
    lines = [f"### Results: {words}", "",
             "| run | budget B | state B | B/param | val loss | vs fp32 AdamW | vs uniform 4-bit | codec changes | monitoring % |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    names = {"adamw": "fp32 AdamW", "qadamw8": "uniform 8-bit", "qadamw4": "uniform 4-bit", "hybrid_adam": "HybridAdam"}
    rows = [(names[g.optimizer], None, g) for g in baselines] + [(_describe(r), r.budget, r.group) for r in budget]
    for name, limit, g in rows:
        if not g.ok:
            lines.append(f"| {name} | {limit or '-'} | diverged in every seed | | | | | | |")
            continue
        loss, sb = g.stat("final_val_loss")[0], g.stat("state_bytes")[0]
        changes = aa.mean_sd_text([r["plan_transitions"] for r in g.ok if r.get("plan_transitions") is not None], ".1f")
        mon = aa.mean_sd_text([100 * r["monitor_overhead"] for r in g.ok if r.get("monitor_overhead") is not None], ".2f")
        lines.append(f"| {name} | {f'{limit:,}' if limit else '-'} | {sb:,.0f} | {g.stat('state_bytes_per_param')[0]:.3f} | "
                     f"{_loss(g)} | {(loss / ref.stat('final_val_loss')[0] - 1) * 100:+.2f} % | "
                     f"{(loss / q4.stat('final_val_loss')[0] - 1) * 100:+.2f} % | {changes if limit else '-'} | {mon if limit else '-'} |")  # fmt: skip
    return "\n".join(lines) + "\n"


PROTOCOL = AdaptivePrecision()
