"""The optimizer's plan (which codec stores each state of each parameter) in ``metrics.jsonl``, over time.

``PlanLogCallback`` writes a ``plan`` line into the run's ``metrics.jsonl`` at the first step, whenever the
plan changes (a dynamic policy such as ``policy.Budget(allocator="dynamic")`` re-planned) and at every log
step (``RunConfig.log_every``)::

    {"kind": "plan", "step": 120, "reason": "change", "changed": ["transformer.h.0.mlp.c_fc.weight"],
     "codecs": {"transformer.h.0.mlp.c_fc.weight": {"exp_avg": "8bit", "exp_avg_sq": "factored"}, ...},
     "bits": {"transformer.h.0.mlp.c_fc.weight": {"exp_avg": 8.5, "exp_avg_sq": 0.09}, ...},
     "state_bytes": 97216, "budget_bytes": 98304, "planned_bytes": 97216, "transitions": 3, "gap": 0.0012}

``codecs`` are the codecs' short names (``codec.describe``); ``bits`` the exact bits each state holds per
parameter element (its bytes x 8 / elements: tables and scales included, so 4-bit is a little over 4);
``budget_bytes`` ... ``gap`` only under a budget policy (its limit, the bytes of its plan, the codec changes
it made so far and the knapsack's optimality-gap bound); the first line also has ``numel`` (elements of each
parameter). An optimizer without plans (``torch.optim.AdamW``) gets no lines.

It also times the steps where the policy measured its error statistics or changed codecs, against the run's
other steps, and adds to the run's summary row: ``plan_transitions``, ``plan_budget_bytes``,
``plan_planned_bytes``, ``monitor_steps`` (steps that measured or re-planned), ``monitor_overhead`` (their
time above the median step, as a fraction of the run's total step time) and ``step_time_mean_ms``.
"""

from __future__ import annotations

import json
import math
import statistics

from ..optimizer_specs import parse_spec
from ..policy.budget import codec_bytes
from ..policy.budget_options import has_budget_options
from ..profiling import state_bytes
from .callbacks import Callback, RunContext
from .metrics import MetricsLog

TIMING_WARMUP_STEPS = 3  # as the training loop: the first steps (kernel builds) are not timed


def plan_of(optimizer, names: dict) -> tuple[dict, dict, dict] | None:
    """``(codecs, bits, numel)`` of every planned parameter, keyed by name; ``None`` for an optimizer without
    plans.

    Args:
        optimizer: the run's optimizer (this library's: ``planned_params`` and ``plan_of``).
        names: ``id(parameter) -> name``.
    """
    if not hasattr(optimizer, "planned_params") or not hasattr(optimizer, "plan_of"):
        return None
    codecs, bits, numel = {}, {}, {}
    for p in optimizer.planned_params():
        name = names.get(id(p), f"param{len(codecs)}")
        plan = optimizer.plan_of(p)
        codecs[name] = {s: c.describe(p) for s, c in plan.items()}
        bits[name] = {s: round(codec_bytes(c, s, p) * 8 / max(1, p.numel()), 4) for s, c in plan.items()}
        numel[name] = p.numel()
    return codecs, bits, numel


def _budget_fields(policy) -> dict:
    """A budget policy's limit, plan bytes, transitions and optimality gap (empty for other policies)."""
    if not hasattr(policy, "planned_bytes"):
        return {}
    gap = float(getattr(policy, "gap", 0.0))
    return {"budget_bytes": int(policy.limit), "planned_bytes": int(policy.planned_bytes()),
            "transitions": int(policy.transitions), "gap": gap if math.isfinite(gap) else None,
            "allocator": getattr(policy, "allocator", None)}  # fmt: skip


def _errors_signature(policy) -> float | None:
    """A number that changes whenever a budget policy records a new error measurement (``policy.errors``)."""
    errors = getattr(policy, "errors", None)
    if not isinstance(errors, dict):
        return None
    return float(sum(v for stats in errors.values() for v in stats.values()))


class PlanLogCallback(Callback):
    """Logs the optimizer's plan into ``metrics.jsonl`` (see the module docstring) and times its monitoring.

    Args:
        every_log_step: also write the plan at every log step, not only when it changes (default True: the
            heat map then has a column per log step).
    """

    def __init__(self, every_log_step: bool = True):
        self.every_log_step = every_log_step
        self.last: str | None = None  # the last logged plan, as JSON
        self.times: list[float] = []  # step time (ms) of every timed step
        self.flags: list[int] = []  # 1 where the policy measured errors or changed a codec at that step
        self.active = True
        self._names: dict = {}
        self._log = None
        self._errors = None
        self._transitions = None

    def on_run_start(self, ctx: RunContext) -> None:
        self._names = {id(p): n for n, p in ctx.named_parameters()}
        self._log = MetricsLog(ctx.run_dir / "metrics.jsonl")
        self.active = plan_of(ctx.optimizer, self._names) is not None
        policy = getattr(ctx.optimizer, "policy", None)
        self._errors = _errors_signature(policy)
        self._transitions = getattr(policy, "transitions", None)

    def on_step_end(self, ctx: RunContext, step: int, metrics: dict) -> None:
        if not self.active:
            return
        self._time(ctx, step, metrics)
        cfg = ctx.cfg
        log_step = step % cfg.log_every == 0 or step == cfg.steps
        if self.last is not None and not log_step and not getattr(ctx.optimizer.policy, "dynamic", False):
            return  # a static policy's plan is made once, at the first step
        plan = plan_of(ctx.optimizer, self._names)
        text = json.dumps(plan[0], sort_keys=True)
        if text == self.last and not (self.every_log_step and log_step):
            return
        reason = "start" if self.last is None else "change" if text != self.last else "log"
        changed = [] if self.last is None else _changed(json.loads(self.last), plan[0])
        self.last = text
        record = {"kind": "plan", "step": step, "reason": reason, "changed": changed, "codecs": plan[0],
                  "bits": plan[1], "state_bytes": state_bytes(ctx.optimizer),
                  **_budget_fields(ctx.optimizer.policy)}  # fmt: skip
        if reason == "start":  # once: the parameters' sizes (the report leaves out small fixed tensors)
            record["numel"] = plan[2]
        self._log.write(record)

    def _time(self, ctx: RunContext, step: int, metrics: dict) -> None:
        """Keep the step's time, flagged when the policy measured errors or changed a codec in it."""
        policy = ctx.optimizer.policy
        errors, transitions = _errors_signature(policy), getattr(policy, "transitions", None)
        flag = int(errors != self._errors or transitions != self._transitions)
        self._errors, self._transitions = errors, transitions
        first = ctx.resumed_from[-1] if ctx.resumed_from else 0
        if step - first > TIMING_WARMUP_STEPS and metrics.get("step_time_ms") is not None:
            self.times.append(float(metrics["step_time_ms"]))
            self.flags.append(flag)

    def overhead(self) -> dict:
        """``monitor_steps``, ``monitor_overhead`` and ``step_time_mean_ms`` from the timed steps."""
        if not self.times:
            return {"monitor_steps": 0, "monitor_overhead": None, "step_time_mean_ms": None}
        plain = [t for t, f in zip(self.times, self.flags) if not f]
        base = statistics.median(plain) if plain else None
        extra = sum(t - base for t, f in zip(self.times, self.flags) if f) if base is not None else None
        return {"monitor_steps": sum(self.flags),
                "monitor_overhead": None if extra is None else extra / sum(self.times),
                "step_time_mean_ms": statistics.mean(self.times)}  # fmt: skip

    def on_run_end(self, ctx: RunContext, result: dict) -> None:
        if not self.active:
            return
        fields = _budget_fields(ctx.optimizer.policy)
        result.update({"plan_transitions": fields.get("transitions"), "plan_budget_bytes": fields.get("budget_bytes"),
                       "plan_planned_bytes": fields.get("planned_bytes"), **self.overhead()})  # fmt: skip

    def state_dict(self) -> dict:
        return {"last": self.last or "", "times": list(self.times), "flags": list(self.flags)}

    def load_state_dict(self, state: dict) -> None:
        self.last = state.get("last") or None
        self.times = [float(t) for t in state.get("times", [])]
        self.flags = [int(f) for f in state.get("flags", [])]


def plan_callbacks(cfg) -> list[Callback]:
    """``[PlanLogCallback()]`` for a run whose optimizer spec sets a memory budget (``budget_bpp=`` /
    ``budget_bytes=``), none otherwise: what ``effopt bench`` attaches (``runner.run_matrix(callbacks=)``).

    Args:
        cfg: the run's ``RunConfig``.
    """
    _, kwargs = parse_spec(cfg.optimizer)
    return [PlanLogCallback()] if has_budget_options(kwargs) else []


def _changed(old: dict, new: dict) -> list[str]:
    """Names of the parameters whose codecs differ between two plans."""
    return [n for n in new if old.get(n) != new[n]]
