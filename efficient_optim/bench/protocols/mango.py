"""Budgeted gradient + momentum compression with a controller (protocol P9): ``effopt suite mango``.

On a small GPT-2 LM and the digits CNN, 3 seeds each (``--quick``: one): fp32 Adam, bf16-state Adam and 8-bit
Adam (no gradient compression), random gradient dropping (``rand10%``, unbiased, no feedback) and DGC (top 1 %
with momentum correction, under plain SGD as DGC prescribes), then 8-bit Adam whose gradients are accumulated
compressed with error feedback and whose per-layer gradient and momentum compression a controller chooses under
one hard training-memory budget (``compress.TrainingBudget``): a static choice (4-bit gradients, 8-bit momentum:
the budget is that choice's exact bytes, measured on the model before the runs), the rule-based controller
(Accordion), the budget planner and the learned policy (the shipped default: BC + PPO; BC only when that file
ships: ``default_bc``). The learned policy is also run on a 4x wider LM (transfer to a larger model than it was trained on) and on
the CNN.

Verdicts: the training-memory reduction against fp32 Adam (measured training bytes: parameters, gradients incl.
compressed buffers and error-feedback residuals, optimizer states) at < 1 % val-loss drop (LM) / accuracy drop
(CNN), target 20-30 %, strong 50 %+; budget violations counted from every controller's decisions (must be 0);
controller overhead per kind (target <= 2 % of step time); whether the learned policy beats the planner and the
rules at the same budget (either way); and the phases of training in plain sentences with a figure of per-layer
bits against the learning rate and the loss. A controller kind this version lacks is reported as skipped, with
the reason.
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

from ..config import RunConfig, slug
from ..mango_analysis import controller_records, draw_phases, phase_sentences, train_records
from ..mango_callback import controller_kinds
from ..report import Group, group_runs, seed_spread
from ..runner import plan_matrix
from .base import MET, NOT_MEASURABLE, NOT_MET, Protocol, Verdict

CNN = {"model": "digits-cnn", "batch_size": 64, "context": None, "layers": None, "width": None, "heads": None}
MODELS = (("lm", "LM"), ("cnn", "CNN"), ("lm-large", "LM 4x wider"))
LARGE_WIDTH = 4  # the transfer LM: this many times the LM's width (the shipped policy was trained up to width 160)
ACCURACY_MODELS = ("cnn",)
STATIC = ("q4", "8bit")  # the static choice; the budget is its exact training bytes on the model
QUALITY_DROP = 0.01
TARGET, STRONG = 0.20, 0.50
OVERHEAD_TARGET = 0.02
CONTROLLED = ("static", "rules", "planner", "learned", "learned-bc")
SHIPPED_POLICY = {"learned": "default", "learned-bc": "default_bc"}  # the shipped policy each learned method runs


@dataclasses.dataclass(frozen=True)
class Method:
    """One compared setting: ``name`` (its label in the settings), ``words``, the optimizer, the gradient
    compression spec and the controller spec (``{every}``, ``{warmup}``, ``{budget}``, ``{policy}`` filled in)."""

    name: str
    words: str
    optimizer: str
    compression: str | None = None
    controller: str | None = None


METHODS = (
    Method("fp32", "fp32 Adam", "qadamw+bits=32"),
    Method("bf16", "bf16-state Adam", "qadamw+bits=16"),
    Method("8bit", "8-bit Adam", "qadamw8"),
    Method("rand", "random dropping (rand10%, no feedback)", "qadamw8", "rand10%+residual=none"),
    Method("dgc", "DGC (top 1 %, SGD)", "sgd+momentum=0", "dgc+fraction=0.01+warmup={warmup}"),
    Method("static", "static (q4 gradients, 8-bit momentum)", "qadamw8", "q8",
           "static+grad=q4+momentum=8bit+every={every}+budget_bytes={budget}"),
    Method("rules", "rule-based (Accordion)", "qadamw8", "q8", "rules+every={every}+warmup_steps={warmup}+budget_bytes={budget}"),
    Method("planner", "budget planner", "qadamw8", "q8", "planner+every={every}+budget_bytes={budget}"),
    Method("learned", "learned policy (BC + PPO)", "qadamw8", "q8", "learned+policy={policy}+every={every}+budget_bytes={budget}"),
    Method("learned-bc", "learned policy (BC only)", "qadamw8", "q8", "learned+policy={policy}+every={every}+budget_bytes={budget}"),
)  # fmt: skip
LARGE_METHODS = ("fp32", "8bit", "static", "planner", "learned")
QUICK_LARGE_METHODS = ("fp32", "planner", "learned")  # --quick: the transfer only
WORDS = {m.name: m.words for m in METHODS}


def model_config(base: RunConfig, label: str) -> RunConfig:
    """The run options of model ``label``: the LM as given, the CNN, or the LM at ``LARGE_WIDTH`` times the width."""
    if label == "cnn":
        return dataclasses.replace(base, **CNN)
    if label == "lm-large":
        from ..models import lm_preset

        width = base.width or lm_preset(base.model).width
        return dataclasses.replace(base, width=LARGE_WIDTH * width)
    return base


def static_budget_bytes(cfg: RunConfig) -> int:
    """The exact training bytes M of the static choice (``STATIC`` for every layer) on ``cfg``'s model, as the
    controllers count them (``Controller.training_bytes``): the budget every controller of the suite gets."""
    import torch

    from ...compress import ControllerPolicy, LayerChoice
    from ...registry import create_optimizer
    from ..mango_callback import build_gradient_compressor, make_run_controller

    with torch.random.fork_rng():
        model = cfg.build_task(torch.device("cpu")).build_model()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = create_optimizer("qadamw8", model, policy=ControllerPolicy())
    ctl = make_run_controller("static+grad={}+momentum={}".format(*STATIC), params, gradients=build_gradient_compressor("q8"),
                              optimizer=opt)  # fmt: skip
    return int(ctl.training_bytes({k: LayerChoice(*STATIC) for k in range(len(params))}))


def _availability(name: str) -> str | None:
    """Why method ``name`` cannot run in this version (None when it can)."""
    kind = {"static": "static", "rules": "rules", "planner": "planner", "learned": "learned", "learned-bc": "learned"}.get(name)
    if kind is None:
        return None
    if kind not in controller_kinds():
        return f"controller kind {kind!r} is not in this version (compress.kinds has {list(controller_kinds())})"
    try:
        from ...compress.budget import TrainingBudget  # noqa: F401
    except ImportError:
        return "compress.budget.TrainingBudget is not in this version: no controller can run under a budget"
    if kind == "learned" and SHIPPED_POLICY[name] not in shipped_policy_names():
        return f"the shipped policy {SHIPPED_POLICY[name]!r} (compress/policies/{SHIPPED_POLICY[name]}.pt) is not in this version"
    return None


def shipped_policy_names() -> list[str]:
    """The learned policies this version ships (``compress.learned.shipped_policies``; none without it)."""
    try:
        from ...compress.learned import shipped_policies
    except ImportError:
        return []
    return shipped_policies()


class BudgetedCompression(Protocol):
    """Baselines, DGC, random dropping and four controller kinds at one training-memory budget (module doc)."""

    name = "mango"
    aliases = ("p9",)
    protocol_id = "P9"
    title = "Budgeted gradient + momentum compression with a controller (P9)"
    defaults = RunConfig(steps=200, width=64, heads=4, context=32, batch_size=16, lr=3e-3, warmup_steps=20)
    quick_steps = 12
    seeds = 3

    def plan(self, base, seeds, quick):
        plan, missing = [], []
        if base.warmup_steps is not None and base.warmup_steps >= base.steps:
            base = dataclasses.replace(base, warmup_steps=max(1, base.steps // 10))
        every, warmup = max(2, base.steps // 10), max(1, base.steps // 10)
        skipped = {}
        for m in METHODS:
            why = _availability(m.name)
            if why is not None:
                skipped[m.name] = why
                missing.append(Verdict(f"{m.words}: skipped", "every model", "not run", NOT_MEASURABLE, why))
        for label, _ in MODELS:
            b = model_config(base, label)
            names = (QUICK_LARGE_METHODS if quick else LARGE_METHODS) if label == "lm-large" else [m.name for m in METHODS]
            budget = static_budget_bytes(b) if "static" not in skipped else None
            for m in METHODS:
                if m.name not in names or m.name in skipped:
                    continue
                ctl = (m.controller.format(every=every, warmup=warmup, budget=budget, policy=SHIPPED_POLICY.get(m.name))
                       if m.controller else None)  # fmt: skip
                comp = m.compression.format(warmup=warmup * 2) if m.compression else None
                over = {"grad_compression": comp, "controller": ctl}
                plan += plan_matrix(b, [m.optimizer], seeds, {f"{label}/{m.name}": over})
        return plan, missing

    # ------------------------------------------------------------------------------------------- verdicts
    def verdicts(self, runs, out: Path, base: RunConfig):
        table = _by_model(runs)
        v = []
        for label, words in MODELS:
            groups = table.get(label, {})
            ref = groups.get("fp32")
            if ref is None or not ref.ok:
                v.append(Verdict("all criteria", words, "n/a", NOT_MEASURABLE, "fp32 Adam has no finished run"))
                continue
            if label != "lm-large":
                v.append(_reduction(groups, ref, label, words))
                v.append(_learned_beats(groups, label, words))
            if label != "lm":
                v.append(_transfer(groups, label, words))
        v.append(_violations(runs))
        v += _overheads(table)
        v += _bc_vs_ppo(table)
        v += _phase_verdicts(out, table)
        return v

    def sections(self, runs, out: Path, base: RunConfig) -> list[str]:
        table = _by_model(runs)
        seeds = len({r["seed"] for r in runs})
        parts = []
        if seeds < 2:
            parts.append("**One seed**: every difference below is a hint, not a finding (the seed-to-seed spread is "
                         "unknown); the full suite runs 3 seeds.\n")  # fmt: skip
        for label, words in MODELS:
            if table.get(label, {}).get("fp32") is not None:
                parts.append(_results_table(table[label], label, words))
        parts += _phase_sections(out, table)
        return parts


# ------------------------------------------------------------------------------------------ helpers
def _by_model(runs: list[dict]) -> dict[str, dict[str, Group]]:
    """model label -> method name -> group (settings are ``<model>/<method>``)."""
    out: dict[str, dict[str, Group]] = {}
    for g in group_runs(runs):
        label, _, method = g.settings.partition("/")
        if method:
            out.setdefault(label, {})[method] = g
    return out


def _mean(g: Group, key: str) -> float | None:
    return g.stat(key)[0]


def memory(g: Group) -> float | None:
    """Mean measured training bytes over seeds (the peak measured in the run where the callback measured it)."""
    values = [r.get("training_bytes_peak") or r["training_bytes_per_param"] * r["num_params"] for r in g.ok]
    return statistics.mean(values) if values else None


def quality_key(label: str) -> str:
    return "val_accuracy" if label in ACCURACY_MODELS else "final_val_loss"


def drop(g: Group, ref: Group, label: str) -> float | None:
    """The quality drop against ``ref`` (positive = worse): relative val-loss rise, or relative accuracy fall."""
    key = quality_key(label)
    a, b = _mean(g, key), _mean(ref, key)
    if a is None or not b:
        return None
    return a / b - 1 if key == "final_val_loss" else 1 - a / b


def _q(g: Group, label: str) -> str:
    key = quality_key(label)
    values = [r[key] for r in g.ok if r.get(key) is not None]
    if not values:
        return "n/a"
    fmt = ".3f" if key == "val_accuracy" else ".4f"
    sd = f" ± {statistics.stdev(values):{fmt}}" if len(values) > 1 else ""
    return f"{statistics.mean(values):{fmt}}{sd}"


def _reduction(groups: dict[str, Group], ref: Group, label: str, words: str) -> Verdict:
    what = "accuracy" if label in ACCURACY_MODELS else "val-loss"
    crit = f"training-memory reduction vs fp32 Adam at < 1 % {what} drop (target 20-30 %, strong 50 %+)"
    base = memory(ref)
    rows = [(n, 1 - memory(g) / base, drop(g, ref, label)) for n, g in groups.items() if n != "fp32" and g.ok and memory(g)]
    fine = [r for r in rows if r[2] is not None and r[2] < QUALITY_DROP]
    if not rows:
        return Verdict(crit, words, "n/a", NOT_MEASURABLE, "no compressed run finished")
    if not fine:
        n, red, d = min(rows, key=lambda r: r[2] if r[2] is not None else 1e9)
        return Verdict(crit, words, f"none within 1 %; closest {WORDS[n]}: {red:.0%} less, drop {d:+.2%}", NOT_MET)
    n, red, d = max(fine, key=lambda r: r[1])
    level = ("strong (>= 50 %)" if red >= STRONG else "above the 20-30 % target, below strong (50 %)" if red > 0.3
             else "in the 20-30 % target range" if red >= TARGET else "below the 20 % target")  # fmt: skip
    others = ", ".join(f"{WORDS[x]} {r:.0%} ({dd:+.2%})" for x, r, dd in sorted(fine, key=lambda r: -r[1])[1:4])
    return Verdict(crit, words, f"{WORDS[n]}: {red:.0%} less training memory ({memory(groups[n]):,.0f} vs {base:,.0f} B), "
                   f"{what} drop {d:+.2%}", MET if red >= TARGET else NOT_MET,
                   f"{level}; next within 1 %: {others or 'none'}")  # fmt: skip


def _compare(a: Group, b: Group, label: str) -> tuple[bool, str]:
    """Whether ``a`` is better than ``b`` beyond the seed spread, and the words for it."""
    key = quality_key(label)
    better = (_mean(a, key) < _mean(b, key)) if key == "final_val_loss" else (_mean(a, key) > _mean(b, key))
    spread = seed_spread(a, b, key)
    return better and spread == "beyond", f"{'better' if better else 'worse'}, {spread} the seed spread"


def _learned_beats(groups: dict[str, Group], label: str, words: str) -> Verdict:
    crit = "learned policy beats the planner and the rules at the same budget"
    learned = groups.get("learned")
    others = {n: groups[n] for n in ("planner", "rules") if n in groups and groups[n].ok}
    if learned is None or not learned.ok or not others:
        return Verdict(crit, words, "n/a", NOT_MEASURABLE, "the learned policy, or both the planner and the rules, did not run")
    results = {n: _compare(learned, g, label) for n, g in others.items()}
    measured = f"learned {_q(learned, label)} ({memory(learned):,.0f} B); " + "; ".join(
        f"{n} {_q(g, label)} ({memory(g):,.0f} B)" for n, g in others.items())  # fmt: skip
    reason = "; ".join(f"vs {n}: {w}" for n, (_, w) in results.items())
    if len(others) < 2:
        reason += "; only one of planner / rules ran"
    return Verdict(crit, words, measured, MET if all(ok for ok, _ in results.values()) and len(others) == 2 else NOT_MET, reason)


def _transfer(groups: dict[str, Group], label: str, words: str) -> Verdict:
    crit = "learned policy transfers: within 1 % of the planner's quality at the same budget"
    learned, planner = groups.get("learned"), groups.get("planner")
    if learned is None or planner is None or not learned.ok or not planner.ok:
        return Verdict(crit, words, "n/a", NOT_MEASURABLE, "the learned policy or the planner did not run here")
    d = drop(learned, planner, label)
    return Verdict(crit, words, f"learned {_q(learned, label)} vs planner {_q(planner, label)} ({d:+.2%})",
                   MET if d < QUALITY_DROP else NOT_MET, f"{seed_spread(learned, planner, quality_key(label))} the seed spread")  # fmt: skip


def _violations(runs: list[dict]) -> Verdict:
    crit = "budget violations (decisions whose training bytes exceed the budget, every controller run)"
    rows = [r for r in runs if r.get("controller_decisions")]
    counted = [r for r in rows if r.get("budget_violations") is not None]
    if not counted:
        return Verdict(crit, "all controllers", "n/a", NOT_MEASURABLE, "no controller run recorded a budget")
    over = sum(r["budget_violations"] for r in counted)
    decisions = sum(r["controller_decisions"] for r in counted)
    worst = max(r["decision_bytes_max"] / r["budget_bytes"] for r in counted if r.get("budget_bytes"))
    return Verdict(crit, "all controllers", f"{over} of {decisions} decisions in {len(counted)} runs",
                   MET if over == 0 else NOT_MET, f"largest decision at {worst:.1%} of its budget")  # fmt: skip


def _overheads(table: dict[str, dict[str, Group]]) -> list[Verdict]:
    out = []
    for name in CONTROLLED:
        rows = [r for groups in table.values() if name in groups for r in groups[name].ok if r.get("controller_overhead") is not None]
        if not rows:
            continue
        values = [100 * r["controller_overhead"] for r in rows]
        mean = statistics.mean(values)
        loaded = any(r.get("timing_loaded") for r in rows)
        reason = f"{len(rows)} runs, {min(values):.2f}-{max(values):.2f} %; observe + decide time over step time"
        if loaded:
            reason += "; the machine was loaded, so timings are noisy"
        out.append(Verdict("controller overhead (share of step time, target <= 2 %)", WORDS[name], f"{mean:.2f} %",
                           MET if mean <= 100 * OVERHEAD_TARGET else NOT_MET, reason))  # fmt: skip
    return out


def _bc_vs_ppo(table: dict[str, dict[str, Group]]) -> list[Verdict]:
    out = []
    for label, words in MODELS:
        groups = table.get(label, {})
        ppo, bc = groups.get("learned"), groups.get("learned-bc")
        if ppo is None or bc is None or not ppo.ok or not bc.ok:
            continue
        better, w = _compare(ppo, bc, label)
        out.append(Verdict("BC + PPO vs BC only", words, f"BC+PPO {_q(ppo, label)} vs BC {_q(bc, label)}", "measured",
                           f"BC+PPO {w}"))  # fmt: skip
    return out


def _first(out: Path, g: Group) -> tuple[dict, list[dict]] | None:
    for r in sorted(g.ok, key=lambda r: r["seed"]):
        lines = controller_records(out / r["run_id"])
        if lines:
            return r, lines
    return None


def _phase_runs(out: Path, table: dict[str, dict[str, Group]]):
    """(model words, method, row, controller lines, train lines) of the first seed of every adaptive controller."""
    for label, words in MODELS:
        for name in ("learned", "planner", "rules"):
            g = table.get(label, {}).get(name)
            found = _first(out, g) if g is not None else None
            if found:
                row, lines = found
                yield label, words, name, row, lines, train_records(out / row["run_id"])


def _phase_verdicts(out: Path, table) -> list[Verdict]:
    v = []
    for _, words, name, row, lines, trains in _phase_runs(out, table):
        sentences = phase_sentences(lines, trains, row.get("target_steps") or row["steps"])
        v.append(Verdict("interpretable phases (sentences and figure in the report)", f"{words}, {WORDS[name]}",
                         f"{len(sentences)} phase(s): {sentences[0]}" if sentences else "no decisions", "measured"))  # fmt: skip
    return v


def _phase_sections(out: Path, table) -> list[str]:
    from ...analysis.plots import pyplot

    plt = pyplot()
    parts = []
    for label, words, name, row, lines, trains in _phase_runs(out, table):
        total = row.get("target_steps") or row["steps"]
        text = [f"### Phases: {words}, {WORDS[name]} (seed {row['seed']})", ""]
        text += [f"- {s}" for s in phase_sentences(lines, trains, total)] + [""]
        fig = draw_phases(lines, trains, total, f"{words}, {WORDS[name]} (seed {row['seed']})", plt) if plt is not None else None
        if fig is not None:
            path = out / f"phases_{slug(label)}_{slug(name)}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            text += [f"![phases]({path.name})", ""]
        parts.append("\n".join(text))
    return parts


def _results_table(groups: dict[str, Group], label: str, words: str) -> str:
    ref = groups["fp32"]
    what = "val accuracy" if label in ACCURACY_MODELS else "val loss"
    lines = [f"### Results: {words}", "",
             f"| method | optimizer | {what} | drop vs fp32 | training B (peak) | B/param | reduction | gradient B | "
             "controller % | budget B | over budget |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    base = memory(ref)
    for name, g in groups.items():
        if not g.ok:
            lines.append(f"| {WORDS.get(name, name)} | {g.optimizer} | diverged in every seed | | | | | | | | |")
            continue
        mem, numel = memory(g), g.ok[0]["num_params"]
        ctl = [100 * r["controller_overhead"] for r in g.ok if r.get("controller_overhead") is not None]
        budget = g.ok[0].get("budget_bytes")
        over = sum(r["budget_violations"] for r in g.ok if r.get("budget_violations") is not None) if budget else None
        d = drop(g, ref, label)
        lines.append(f"| {WORDS.get(name, name)} | `{g.optimizer}` | {_q(g, label)} | {'-' if g is ref else f'{d:+.2%}'} | "
                     f"{mem:,.0f} | {mem / numel:.2f} | {1 - mem / base:.0%} | {_mean(g, 'grad_bytes'):,.0f} | "
                     f"{f'{statistics.mean(ctl):.2f}' if ctl else '-'} | {f'{budget:,}' if budget else '-'} | "
                     f"{'-' if over is None else over} |")  # fmt: skip
    return "\n".join(lines) + "\n"


PROTOCOL = BudgetedCompression()
