"""Gradient compression and a compression controller inside a benchmark run (``RunConfig.grad_compression``,
``RunConfig.controller``): the harness side of MANGO (docs/mango.md).

``train_run`` adds a ``GradientControlCallback`` by itself when a run's settings ask for either; it can also be
passed by hand (``train_run(cfg, out, callbacks=[GradientControlCallback("q4", "rules+every=25")])``).

- ``grad_compression``: ``<compressor spec>[+residual=<spec>|none]`` (``compress.parse_compressor``: ``q8``,
  ``q4``, ``q2``, ``bf16``, ``top10%/q8``, ``rand10%``, ...; error feedback with an 8-bit residual unless
  ``residual=none``), or ``dgc[+fraction=F][+momentum=M][+clip=C][+warmup=N]`` (deep gradient compression,
  meant for an optimizer without its own momentum, e.g. ``sgd+momentum=0``). With one of this library's
  optimizers (they step one parameter at a time) every micro-batch's gradient is folded into compressed
  buffers during backward (``compress.GradAccumulator``, also at ``grad_accum`` 1): only one full gradient
  exists at a time. Otherwise (DGC, ``torch.optim``) ``p.grad`` is compressed in place before the step: the
  numbers are those of compressed gradients, the memory is not saved.
- ``controller``: ``<kind>[+key=value...]``, a kind of ``compress.kinds`` (``static``, ``rules``, ``planner``,
  ``learned``) with its options: ``every`` (decide every N steps), ``budget_bpp`` / ``budget_bytes`` (a hard
  training-memory budget, ``compress.budget.TrainingBudget``), ``grad`` + ``momentum`` (static: one choice for
  every layer), ``low`` / ``high`` as ``grad:momentum`` (rules: ``low=q2:4bit``), ``policy`` (learned); any
  other key goes to the controller as is. The optimizer is built with ``policy=ControllerPolicy()``.

The controller observes each layer's gradient, is stepped after every optimizer step with the step's loss,
and every decision is written to ``metrics.jsonl`` as a ``controller`` line (per-layer gradient and momentum
specs and bits, the learning rate, the loss, the decision's training bytes and the budget). Its state, the
compressor's residuals and the timings are saved in the run's checkpoint: a resumed run is exact.
The summary row gains ``training_bytes`` (measured: parameters + gradient buffers and residuals + the full
gradients alive at the step + optimizer states), ``training_bytes_peak`` (the largest measured at the
decisions and log steps; ``training_bytes_per_param`` is recomputed from it), ``grad_buffer_bytes``,
``controller_decisions``, ``controller_overhead`` (time in the controller's observe and step calls over the
step time, after the timing warm-up), ``budget_bytes``, ``decision_bytes_max`` and ``budget_violations``
(decisions whose training bytes exceed the budget).
"""

from __future__ import annotations

import inspect
import re
import time

import torch

from ..compress import (
    ControllerPolicy,
    ErrorFeedback,
    GradAccumulator,
    LayerChoice,
    NoFeedback,
    parse_compressor,
)
from ..compress.dgc import DGC
from ..optimizer_specs import parse_spec
from ..profiling import training_bytes
from .callbacks import Callback, RunContext
from .metrics import MetricsLog

TIMING_WARMUP_STEPS = 3  # as the training loop: the first steps (kernel builds) are not timed
MOMENTUM_BITS = {"fp32": 32.0, "bf16": 16.0, "fp16": 16.0, "8bit": 8.0, "4bit": 4.0}
DGC_OPTIONS = {"fraction": "fraction", "momentum": "momentum", "clip": "clip_norm", "warmup": "warmup_calls"}
FALLBACK_KINDS = ("static", "rules")  # kinds this module builds itself when compress.kinds is missing


# ------------------------------------------------------------------------------------ specs
def build_gradient_compressor(spec: str, seed: int = 0):
    """The ``GradientCompressor`` a ``grad_compression`` spec names (see the module doc).

    Args:
        spec: ``<compressor spec>[+residual=<spec>|none]`` or ``dgc[+fraction=..][+momentum=..][+clip=..][+warmup=..]``.
        seed: seeds the compressor's random draws (default 0; a run uses its own seed).
    """
    name, opts = parse_spec(spec)
    if name == "dgc":
        unknown = sorted(set(opts) - set(DGC_OPTIONS))
        if unknown:
            raise ValueError(f"grad_compression {spec!r}: unknown DGC option(s) {unknown}; use {sorted(DGC_OPTIONS)}")
        return DGC(**{DGC_OPTIONS[k]: v for k, v in opts.items()}, seed=seed)
    unknown = sorted(set(opts) - {"residual"})
    if unknown:
        raise ValueError(f"grad_compression {spec!r}: unknown option(s) {unknown}; only residual=<spec>|none")
    compressor = parse_compressor(name)
    residual = str(opts.get("residual", "q8"))
    if residual == "none":
        return NoFeedback(compressor, seed=seed)
    return ErrorFeedback(compressor, residual=parse_compressor(residual), seed=seed)


def _choice(text: str, key: str) -> LayerChoice:
    grad, sep, momentum = str(text).partition(":")
    if not sep:
        raise ValueError(f"controller option {key}={text!r} must look like <grad spec>:<momentum spec>, e.g. q2:4bit")
    return LayerChoice(grad or None, momentum or None)


def controller_kinds() -> tuple[str, ...]:
    """The controller kinds this version can build (``compress.kinds.CONTROLLER_KINDS``, or the two built here)."""
    try:
        from ..compress.kinds import CONTROLLER_KINDS
    except ImportError:
        return FALLBACK_KINDS
    return tuple(CONTROLLER_KINDS)


def controller_options(spec: str) -> tuple[str, dict]:
    """``(kind, keyword arguments)`` of a ``controller`` spec (see the module doc); ``ValueError`` for an unknown
    kind or a malformed option."""
    kind, opts = parse_spec(spec)
    if kind not in controller_kinds():
        raise ValueError(f"controller {spec!r}: unknown kind {kind!r}; this version has {list(controller_kinds())}")
    kwargs = dict(opts)
    if "budget_bpp" in kwargs or "budget_bytes" in kwargs:
        try:
            from ..compress.budget import TrainingBudget
        except ImportError:
            raise ValueError(f"controller {spec!r}: a training-memory budget needs compress.budget.TrainingBudget, "
                             "which this version does not have") from None  # fmt: skip
        kwargs["budget"] = TrainingBudget(bytes=kwargs.pop("budget_bytes", None), bytes_per_param=kwargs.pop("budget_bpp", None))
    if kind == "static":
        grad, momentum = kwargs.pop("grad", None), kwargs.pop("momentum", None)
        if grad is None and momentum is None:
            raise ValueError(f"controller {spec!r}: a static controller needs grad=<spec> and/or momentum=<spec>")
        choice = LayerChoice(grad, momentum)
        kwargs["choices"] = lambda key, param: choice
    for key in ("low", "high"):
        if key in kwargs:
            kwargs[key] = _choice(kwargs[key], key)
    return kind, kwargs


def make_run_controller(spec: str, params, **kwargs):
    """The controller a ``controller`` spec names, over ``params`` (``compress.kinds.make_controller`` when
    this version has it; else ``static`` and ``rules`` are built here).

    Args:
        spec: ``kind[+key=value...]``.
        params: the parameters it controls (their positions are its keys).
        kwargs: more controller arguments (``gradients``, ``optimizer``).
    """
    kind, options = controller_options(spec)
    try:
        from ..compress.kinds import make_controller
    except ImportError:
        from ..compress import AccordionController, StaticController

        cls = {"static": StaticController, "rules": AccordionController}[kind]
        return cls(params, **options, **kwargs)
    return make_controller(kind, params, **options, **kwargs)


def check_run_options(cfg) -> None:
    """``ValueError`` for a ``grad_compression`` or ``controller`` setting of ``cfg`` that cannot run."""
    if cfg.grad_release:
        raise ValueError("grad_compression / controller: the harness compresses gradients through accumulation, not "
                         "with gradient release; drop grad_release")  # fmt: skip
    if cfg.grad_compression is not None:
        if not isinstance(cfg.grad_compression, str):
            raise ValueError(f"grad_compression must be a spec string such as 'q8', got {cfg.grad_compression!r}")
        gc = build_gradient_compressor(cfg.grad_compression)
        if cfg.controller is not None and isinstance(gc, DGC):
            raise ValueError("a controller cannot change DGC's per-layer compressors; use an error-feedback spec")
    if cfg.controller is not None:
        if not isinstance(cfg.controller, str):
            raise ValueError(f"controller must be a spec string such as 'rules+every=25', got {cfg.controller!r}")
        controller_options(cfg.controller)


def grad_bits(spec: str | None, numel: int) -> float | None:
    """Exact bits per gradient element of compressor ``spec`` on a tensor of ``numel`` elements."""
    if spec is None:
        return None
    return parse_compressor(spec).nbytes(numel) * 8 / max(1, numel)


def momentum_bits(spec: str | None) -> float | None:
    """Nominal bits per element of a momentum spec (``fp32`` 32, ``bf16`` 16, ``8bit`` 8, ``4bit`` 4, ...)."""
    if spec is None:
        return None
    if spec in MOMENTUM_BITS:
        return MOMENTUM_BITS[spec]
    digits = re.match(r"^(\d+)bit", spec)
    return float(digits.group(1)) if digits else None


# ------------------------------------------------------------------------------------ the callback
def budget_limit(controller) -> int | None:
    """The controller's training-memory budget in bytes (``TrainingBudget.limit``), or None without one."""
    budget = getattr(controller, "budget", None)
    return None if budget is None else int(budget.limit(controller))


def _history_bytes(entry: dict, limit: int | None) -> tuple[int | None, int | None]:
    """``(training bytes, budget bytes)`` of a controller's history entry (``None`` where there is none)."""
    nbytes = entry.get("training_bytes")
    budget = entry.get("budget_bytes", limit)
    return (int(nbytes) if nbytes is not None else None), (int(budget) if budget is not None else None)


class GradientControlCallback(Callback):
    """Compresses a run's gradients and runs a compression controller over it (see the module doc).

    Args:
        compression: the ``grad_compression`` spec (default None: ``fp32`` with an 8-bit residual when a
            controller is given, else no compression).
        controller: the ``controller`` spec (default None: no controller).
        seed: seeds the compressor's random draws (default 0; ``from_config`` uses the run's seed).
        log_decisions: write a ``controller`` line into ``metrics.jsonl`` at every decision (default True).
    """

    key = "gradient_control"

    def __init__(self, compression: str | None = None, controller: str | None = None, seed: int = 0,
                 log_decisions: bool = True):  # fmt: skip
        if compression is None and controller is None:
            raise ValueError("GradientControlCallback needs a gradient compression spec, a controller spec or both")
        self.compression = compression if compression is not None else "fp32"
        self.controller_spec = controller
        self.seed, self.log_decisions = seed, log_decisions
        build_gradient_compressor(self.compression)  # a bad spec fails now, not after the model is built
        if controller is not None:
            controller_options(controller)
        self.gradients = None
        self.accumulator: GradAccumulator | None = None
        self.controller = None
        self.params: list = []
        self.names: list[str] = []
        self._saved: dict | None = None
        self._log: MetricsLog | None = None
        self._observe_s = 0.0
        self.timing = {"step_ms": [], "controller_ms": [], "first_step": 0}
        self.peak_bytes = 0
        self._numel_logged = False
        self._takes_loss = False

    @classmethod
    def from_config(cls, cfg) -> GradientControlCallback:
        """The callback a run's settings ask for (``cfg.grad_compression``, ``cfg.controller``, ``cfg.seed``)."""
        return cls(cfg.grad_compression, cfg.controller, seed=cfg.seed)

    def optimizer_options(self, cfg) -> dict:
        return {"policy": ControllerPolicy()} if self.controller_spec is not None else {}

    # ------------------------------------------------------------------------------- set-up
    def on_run_start(self, ctx: RunContext) -> None:
        named = ctx.named_parameters()
        self.params, self.names = [p for _, p in named], [n for n, _ in named]
        self.gradients = build_gradient_compressor(self.compression, seed=self.seed)
        steps_one = hasattr(ctx.optimizer, "step_param") and not isinstance(self.gradients, DGC)
        if self.controller_spec is not None:
            self.controller = make_run_controller(self.controller_spec, self.params, gradients=self.gradients,
                                                  optimizer=ctx.optimizer)  # fmt: skip
            self._takes_loss = "loss" in inspect.signature(self.controller.step).parameters
        if steps_one:
            self.accumulator = GradAccumulator(self.params, self.gradients, observer=self._observe)
            ctx.gradient_accumulator = self.accumulator
        if self._saved is not None:
            self._restore(self._saved)
            self._saved = None
        self.timing["first_step"] = ctx.step
        self._log = MetricsLog(ctx.run_dir / "metrics.jsonl")

    def _observe(self, key: int, grad: torch.Tensor) -> None:
        if self.controller is None:
            return
        t0 = time.perf_counter()
        self.controller.observe(key, grad)
        self._observe_s += time.perf_counter() - t0

    # ------------------------------------------------------------------------------- per step
    @torch.no_grad()
    def on_before_optimizer_step(self, ctx: RunContext, step: int) -> None:
        if self.accumulator is not None:
            return
        for key, p in enumerate(self.params):  # compressed in place: the optimizer steps on what a receiver decodes
            if p.grad is None:
                continue
            self._observe(key, p.grad)
            p.grad.copy_(self.gradients.roundtrip(key, p.grad).view_as(p.grad).to(p.grad.dtype))

    def on_step_end(self, ctx: RunContext, step: int, metrics: dict) -> None:
        decided = None
        t0 = time.perf_counter()
        if self.controller is not None:
            kwargs = {"loss": metrics["train_loss"]} if self._takes_loss else {}
            decided = self.controller.step(step - 1, total_steps=ctx.cfg.steps, **kwargs)
        spent_ms = (time.perf_counter() - t0 + self._observe_s) * 1e3
        self._observe_s = 0.0
        if step - self.timing["first_step"] > TIMING_WARMUP_STEPS:
            self.timing["step_ms"].append(metrics["step_time_ms"] + (time.perf_counter() - t0) * 1e3)
            self.timing["controller_ms"].append(spent_ms)
        log_step = step % ctx.cfg.log_every == 0 or step == ctx.cfg.steps
        if decided is not None or log_step:
            self.peak_bytes = max(self.peak_bytes, self.measured_bytes(ctx)["total"])
        if decided is not None and self.log_decisions:
            self._log_decision(ctx, step, metrics)

    def measured_bytes(self, ctx: RunContext) -> dict:
        """``profiling.training_bytes`` of the run now (compressed buffers and residuals included; without an
        accumulator the in-place compressor's state is added to the full gradients)."""
        tb = training_bytes(ctx.model, ctx.optimizer, accumulator=self.accumulator)
        if self.accumulator is None:
            extra = self.gradients.state_nbytes()
            tb = {**tb, "grads": tb["grads"] + extra, "grad_buffers": tb["grad_buffers"] + extra, "total": tb["total"] + extra}
        return tb

    def _log_decision(self, ctx: RunContext, step: int, metrics: dict) -> None:
        entry = self.controller.history[-1] if self.controller.history else {}
        nbytes, budget = _history_bytes(entry, budget_limit(self.controller))
        grad = {n: self.controller.current.get(k, LayerChoice()).grad for k, n in enumerate(self.names)}
        mom = {n: self.controller.current.get(k, LayerChoice()).momentum for k, n in enumerate(self.names)}
        sizes = {n: p.numel() for n, p in zip(self.names, self.params)}
        record = {"kind": "controller", "step": step, "decision_step": entry.get("step", step - 1),
                  "lr": metrics.get("lr"), "train_loss": metrics.get("train_loss"), "grad": grad, "momentum": mom,
                  "grad_bits": {n: grad_bits(s, sizes[n]) for n, s in grad.items()},
                  "momentum_bits": {n: momentum_bits(s) for n, s in mom.items()},
                  "training_bytes": nbytes, "budget_bytes": budget}  # fmt: skip
        if not self._numel_logged:  # the layers' sizes, once per call of train_run
            record["numel"], self._numel_logged = sizes, True
        self._log.write(record)

    # ------------------------------------------------------------------------------- the end
    def on_run_end(self, ctx: RunContext, result: dict) -> None:
        tb = self.measured_bytes(ctx)
        peak = max(self.peak_bytes, tb["total"])
        numel = max(1, result.get("num_params") or sum(p.numel() for p in self.params))
        steps, spent = sum(self.timing["step_ms"]), sum(self.timing["controller_ms"])
        result.update({
            "grad_compression": self.compression, "controller": self.controller_spec,
            "gradient_mode": "accumulator" if self.accumulator is not None else "in_place",
            "training_bytes": tb["total"], "training_bytes_peak": peak, "training_bytes_per_param": peak / numel,
            "grad_bytes": tb["grads"], "grad_buffer_bytes": tb["grad_buffers"],
            "compressor_state_bytes": self.gradients.state_nbytes(),
        })  # fmt: skip
        if ctx.device.type != "cuda":
            result["peak_memory_bytes"] = peak
        if self.accumulator is not None:
            result["skipped_steps"] = result.get("skipped_steps", 0) + self.accumulator.skipped_steps
        if self.controller is None:
            return
        limit = budget_limit(self.controller)
        recorded = [_history_bytes(e, limit) for e in self.controller.history]
        budgets = [b for _, b in recorded if b is not None]
        over = [n for n, b in recorded if n is not None and b is not None and n > b]
        result.update({
            "controller_kind": parse_spec(self.controller_spec)[0], "controller_decisions": len(self.controller.history),
            "controller_overhead": spent / steps if steps > 0 else None,
            "controller_time_ms_mean": spent / len(self.timing["controller_ms"]) if self.timing["controller_ms"] else None,
            "budget_bytes": min(budgets) if budgets else None,
            "decision_bytes_max": max((n for n, _ in recorded if n is not None), default=None),
            "budget_violations": len(over) if budgets else None,
        })  # fmt: skip

    # ------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        state = {"gradients": self.gradients.state_dict(), "timing": {k: v for k, v in self.timing.items() if k != "first_step"},
                 "peak_bytes": self.peak_bytes}  # fmt: skip
        if self.accumulator is not None:
            state["accumulator"] = self.accumulator.state_dict()
        if self.controller is not None:
            state["controller"] = self.controller.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self._saved = state  # applied in on_run_start, once the compressor and the controller exist

    def _restore(self, state: dict) -> None:
        if self.accumulator is not None and "accumulator" in state:
            self.accumulator.load_state_dict(state["accumulator"])  # the compressor's state with it
        else:
            self.gradients.load_state_dict(state["gradients"])
        if self.controller is not None:
            self.controller.load_state_dict(state["controller"])
        self.timing.update({k: list(v) for k, v in state.get("timing", {}).items()})
        self.peak_bytes = int(state.get("peak_bytes", 0))
