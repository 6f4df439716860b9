"""What the adaptive-precision suite's runs say: the budgets measured for a model, the role of each run
(a baseline, an allocator at uniform 4-bit's or HybridAdam's bytes, a point of the bytes-per-parameter grid),
and which layers got the bits, in sentences (``bench.protocols.adaptive`` uses these for its verdicts).
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

import torch

from ..optimizer_specs import parse_spec
from ..profiling import state_bytes
from ..registry import create_optimizer
from .config import RunConfig
from .plan_report import STATE_SHORT, block_index, layer_kind, plan_records, shown_parameters
from .report import Group

ALLOCATOR_WORDS = {"fixed": "fixed rule", "data": "data-driven", "dynamic": "dynamic"}


def measure_state_bytes(base: RunConfig, spec: str) -> int:
    """Exact optimizer-state bytes of ``spec`` on ``base``'s model: built on the CPU and stepped once.

    Args:
        base: the run settings (model, data, dtype); its optimizer is replaced by ``spec``.
        spec: an optimizer spec (``qadamw4``, ``hybrid_adam``, ...).
    """
    cfg = dataclasses.replace(base, optimizer=spec, device="cpu")
    task = cfg.build_task(torch.device("cpu"))
    model = task.build_model().to(dtype=getattr(torch, cfg.param_dtype))
    name, kwargs = cfg.optimizer_kwargs()
    opt = create_optimizer(name, model, **kwargs)
    task.loss(model, task.train_batch(torch.Generator().manual_seed(cfg.seed))).backward()
    opt.step()
    return state_bytes(opt)


def budget_room(base: RunConfig, budget: int) -> tuple[int, bool]:
    """``(floor, room)``: the bytes of the cheapest plan a budget can make on ``base``'s model, and whether
    ``budget`` leaves room for at least one state above its cheapest codec (if not, every allocator makes the
    same plan)."""
    cfg = dataclasses.replace(base, device="cpu")
    model = cfg.build_task(torch.device("cpu")).build_model()
    opt = create_optimizer("qadamw", model, budget_bpp=64.0, allocator="fixed")
    policy = opt.policy
    cheapest = {k: it.cheapest() for k, it in policy.items.items()}
    floor = policy.plan_bytes(cheapest)
    steps = [n - it.nbytes[cheapest[k]] for k, it in policy.items.items() for n in it.nbytes if n > it.nbytes[cheapest[k]]]
    return floor, bool(steps) and floor + min(steps) <= budget


def spec_budget(spec: str) -> tuple[str | None, str | None, float | None]:
    """``(allocator, "bytes" | "bpp", value)`` of a budget spec; ``(None, None, None)`` for any other spec."""
    _, kw = parse_spec(spec)
    for key, unit in (("budget_bytes", "bytes"), ("budget_bpp", "bpp")):
        if key in kw:
            return kw.get("allocator", "data"), unit, float(kw[key])
    return None, None, None


@dataclasses.dataclass
class BudgetRun:
    """A group of runs under a budget: its allocator, budget (bytes) and role in the suite.

    Args:
        group: the runs (one optimizer spec, one setting).
        allocator: ``fixed``, ``data`` or ``dynamic``.
        budget: the budget in bytes (from the runs' logged plans, else the spec).
        role: ``4bit`` (uniform 4-bit's bytes), ``hybrid`` (HybridAdam's), ``grid`` (a bytes-per-parameter point).
        bpp: the grid's bytes per parameter (``None`` outside the grid).
        shared: the run stands for every allocator (the budget left no choice, so it was run once).
    """

    group: Group
    allocator: str
    budget: int | None
    role: str
    bpp: float | None = None
    shared: bool = False


def budget_runs(groups: list[Group], setting: str, bytes4: float | None, bytes_hybrid: float | None) -> list[BudgetRun]:
    """The budget groups of ``setting``, with their roles (a spec at ``budget_bytes`` equal to uniform 4-bit's
    measured bytes is role ``4bit``; equal to HybridAdam's, ``hybrid``; ``budget_bpp`` specs are ``grid``)."""
    out = []
    for g in groups:
        if g.settings != setting:
            continue
        allocator, unit, value = spec_budget(g.optimizer)
        if allocator is None:
            continue
        limits = [r.get("plan_budget_bytes") for r in g.ok if r.get("plan_budget_bytes")]
        budget = int(limits[0]) if limits else (int(value) if unit == "bytes" else None)
        if unit == "bpp":
            out.append(BudgetRun(g, allocator, budget, "grid", value))
        elif bytes4 is not None and int(value) == int(bytes4):
            out.append(BudgetRun(g, allocator, budget, "4bit"))
        elif bytes_hybrid is not None and int(value) == int(bytes_hybrid):
            out.append(BudgetRun(g, allocator, budget, "hybrid"))
    hybrid = [r for r in out if r.role == "hybrid"]
    if len(hybrid) == 1 and hybrid[0].allocator == "fixed":  # planned once: no allocator had a choice
        hybrid[0].shared = True
    return out


def final_plans(out: Path, g: Group) -> list[dict]:
    """The last ``plan`` line of each finished seed of ``g`` (seeds that logged one)."""
    plans = []
    for r in g.ok:
        records = plan_records(out / r["run_id"])
        if records:
            plans.append(records[-1] | {"numel": next((x["numel"] for x in records if "numel" in x), {}),
                                        "shown": shown_parameters(records)})  # fmt: skip
    return plans


def _mean_bits(plans: list[dict], state: str, key) -> dict:
    """Bits per element of ``state``, averaged over the elements of the parameters in each ``key(name)`` class
    and over seeds."""
    sums: dict = {}
    for plan in plans:
        for name in plan["shown"]:
            bits = plan["bits"].get(name, {}).get(state)
            cls = key(name)
            if bits is None or cls is None:
                continue
            n = plan["numel"].get(name, 1)
            s = sums.setdefault(cls, [0.0, 0])
            s[0] += bits * n
            s[1] += n
    return {k: v[0] / v[1] for k, v in sums.items() if v[1]}


def _exceptions(plans: list[dict], state: str) -> tuple[str | None, list[str]]:
    """The most common codec of ``state`` in the final plans, and the parameters stored otherwise (with how
    many seeds)."""
    counts: dict = {}
    for plan in plans:
        for name in plan["shown"]:
            codec = plan["codecs"].get(name, {}).get(state)
            if codec is not None:
                counts.setdefault(codec, []).append(name)
    if not counts:
        return None, []
    common = max(counts, key=lambda c: len(counts[c]))
    others: dict = {}
    for codec, names in counts.items():
        if codec != common:
            for n in names:
                others[(n, codec)] = others.get((n, codec), 0) + 1
    short = [f"{n.removeprefix('transformer.').removesuffix('.weight')} {codec}" + (f" ({k}/{len(plans)} seeds)" if len(plans) > 1 else "")
             for (n, codec), k in others.items()]  # fmt: skip
    return common, short


def _where_text(kinds: dict, depth: dict) -> str:
    """Which kind of layer and which blocks hold the most bits, in words."""
    order = sorted(kinds.items(), key=lambda kv: -kv[1])
    if len(order) > 1 and order[0][1] <= order[-1][1] * 1.05:
        text = f"every kind of layer gets about the same ({', '.join(f'{k} {b:.1f}' for k, b in order)} bits per element)"
    else:
        text = f"the {order[0][0]} layers get the most ({order[0][1]:.1f} bits per element)"
        if len(order) > 1:
            text += ", then " + ", ".join(f"{k} {b:.1f}" for k, b in order[1:])
    if len(depth) > 1:
        blocks = sorted(depth.items())
        first, last = blocks[0][1], blocks[-1][1]
        trend = ("earlier blocks more than later ones" if first > last * 1.02 else
                 "later blocks more than earlier ones" if last > first * 1.02 else "about the same in every block")  # fmt: skip
        text += "; " + trend + " (" + ", ".join(f"block {k}: {b:.1f}" for k, b in blocks) + ")"
    return text


def layer_sentences(out: Path, run: BudgetRun, model_words: str) -> list[str]:
    """Which layers got the bits under ``run``'s final plans, in plain sentences (empty without plans)."""
    plans = final_plans(out, run.group)
    if not plans:
        return []
    states = list(dict.fromkeys(s for p in plans for n in p["shown"] for s in p["codecs"].get(n, {})))
    seeds = f"{len(plans)} seed{'s' if len(plans) > 1 else ''}"
    who = "every allocator (one plan: no state fits above its cheapest codec)" if run.shared else \
        f"{ALLOCATOR_WORDS.get(run.allocator, run.allocator)} allocator"
    head = f"{model_words}, {who} at {run.budget:,} bytes ({seeds})"
    lines = []
    for state in states:
        kinds, depth = _mean_bits(plans, state, layer_kind), _mean_bits(plans, state, block_index)
        if not kinds:
            continue
        common, exceptions = _exceptions(plans, state)
        text = f"{head}, {STATE_SHORT.get(state, state)} ({state}): {_where_text(kinds, depth)}. "
        text += f"Most of these states are {common}" + (f"; the others: {', '.join(exceptions)}." if exceptions else ", all of them.")
        lines.append(text)
    changes = _changes_text(out, run)
    if changes:
        lines.append(f"{head}: {changes}")
    return lines


def _changes_text(out: Path, run: BudgetRun, limit: int = 6) -> str:
    """The codec changes of the first seed's run, in order (up to ``limit``), or an empty string."""
    first = sorted(run.group.ok, key=lambda r: r["seed"])
    records = plan_records(out / first[0]["run_id"]) if first else []
    moves = []
    for before, after in zip(records, records[1:]):
        for name in after.get("changed", []):
            for state, codec in after["codecs"][name].items():
                old = before["codecs"].get(name, {}).get(state)
                if old != codec:
                    moves.append(f"step {after['step']}: {name.removeprefix('transformer.').removesuffix('.weight')} "
                                 f"{STATE_SHORT.get(state, state)} {old} -> {codec}")  # fmt: skip
    if not moves:
        return ""
    shown = "; ".join(moves[:limit]) + (f"; ... ({len(moves)} in all)" if len(moves) > limit else "")
    return f"codec changes in seed {first[0]['seed']}: {shown}."


def depth_summary(out: Path, run: BudgetRun) -> str:
    """Early vs late and per-kind bits of the first moment in a few words, for a verdict's measured cell."""
    plans = final_plans(out, run.group)
    if not plans:
        return "no plan logged"
    state = next(iter(plans[0]["codecs"][plans[0]["shown"][0]])) if plans[0]["shown"] else None
    if state is None:
        return "no plan logged"
    kinds = _mean_bits(plans, state, layer_kind)
    order = sorted(kinds.items(), key=lambda kv: -kv[1])
    return f"{STATE_SHORT.get(state, state)}: " + " > ".join(f"{k} {b:.1f}" for k, b in order) + " bits"


def mean_sd_text(values: list[float], fmt: str = ".4f") -> str:
    """``mean ± sd`` (sd only over two or more values)."""
    if not values:
        return "n/a"
    text = format(statistics.mean(values), fmt)
    return text + (f" ± {format(statistics.stdev(values), fmt)}" if len(values) > 1 else " (1 seed)")
