"""Callbacks: how probes, controllers and loggers take part in a benchmark run without touching the loop.

``train_run(cfg, run_dir, callbacks=[...])`` calls each callback's hooks, in list order, at fixed points of
every step (``bench.train``); a hook that is not overridden costs one empty call. A callback reaches the run
through the ``RunContext`` it is handed (the model, the optimizer, the task, ...); it never needs torch's
global optimizer hooks.

    class PrintLoss(Callback):
        def on_log(self, ctx, step, record):
            if record["kind"] == "train":
                print(step, record["train_loss"])

    train_run(cfg, run_dir, callbacks=[PrintLoss()])

Hooks, in the order a run calls them:

- ``optimizer_options(cfg)``: before the optimizer is built: extra keyword arguments for it (e.g. a
  ``policy``; default none). Two callbacks may not set the same one.
- ``on_run_start(ctx)``: once per call of ``train_run``, after the model and optimizer exist and, on a resumed
  run, after the checkpoint (and each callback's saved state) was loaded: ``ctx.step`` is where it resumes.
- ``on_before_optimizer_step(ctx, step)`` / ``on_after_optimizer_step(ctx, step)``: around every
  ``optimizer.step()`` (``step`` counts from 1); the gradients are in ``p.grad`` (clipped). Their time counts
  in the optimizer's step time. Not called with gradient release (the parameters step inside backward).
- ``on_step_end(ctx, step, metrics)``: after every step; ``metrics``: ``train_loss`` (this step's), ``lr``,
  ``grad_norm`` (``None`` with gradient release), ``step_time_ms``.
- ``on_log(ctx, step, record)``: every line written to ``metrics.jsonl`` (``kind`` train, eval or test).
- ``on_eval(ctx, step, metrics)``: after each validation evaluation (``val_loss``, ``val_ppl``), the final one
  included. The test split is never shown to it: it is for the report, not for decisions.
- ``on_run_end(ctx, result)``: once the run finished (not when it was interrupted); it may add fields to
  ``result``, the run's summary row, before ``result.json`` is written.

A callback with state that must survive an interruption returns it from ``state_dict()`` (plain tensors and
Python scalars, lists, dicts: ``torch.load(weights_only=True)`` must read it) and takes it back in
``load_state_dict``; it is saved in the run's checkpoint under the callback's ``key`` (default: its class
name, numbered when a run has several of one class).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class RunContext:
    """What a callback sees of the run.

    Args:
        cfg: the run's ``RunConfig``.
        run_dir: the run's folder.
        device: where it trains.
        task: the ``bench.tasks`` task (data, batches, loss, evaluation).
        model: the model being trained.
        optimizer: the run's optimizer.
        scheduler: its learning-rate schedule (a ``LambdaLR``).
        stats: the run's running statistics (``step``, losses, timings, ...), saved in the checkpoint.
        gradient_accumulator: a ``compress.GradAccumulator`` a callback installed in ``on_run_start``
            (default None): the gradients are then folded into its compressed buffers during backward and
            the loop steps through it (``accumulator.step(optimizer, max_norm=clip)``), not ``optimizer.step()``.
    """

    cfg: object
    run_dir: Path
    device: torch.device
    task: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    stats: dict = field(default_factory=dict)
    gradient_accumulator: object = None

    @property
    def step(self) -> int:
        """Optimizer steps done so far (the step a resumed run restarts from, in ``on_run_start``)."""
        return self.stats.get("step", 0)

    @property
    def resumed_from(self) -> list[int]:
        """The steps of the checkpoints this run resumed from (empty for a fresh run)."""
        return list(self.stats.get("resumed_from", []))

    def named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """The model's trainable parameters with their names, in ``model.parameters()`` order."""
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]


class Callback:
    """Base class: every hook does nothing; override the ones you need (see the module docstring)."""

    key: str | None = None  # the name its state is saved under in a checkpoint (default: the class name)

    def optimizer_options(self, cfg) -> dict:
        """Extra keyword arguments for the run's optimizer (e.g. ``{"policy": ...}``); default none."""
        return {}

    def on_run_start(self, ctx: RunContext) -> None:
        """The run starts (or resumes at ``ctx.step``)."""

    def on_before_optimizer_step(self, ctx: RunContext, step: int) -> None:
        """Right before ``optimizer.step()`` of step ``step`` (from 1)."""

    def on_after_optimizer_step(self, ctx: RunContext, step: int) -> None:
        """Right after ``optimizer.step()`` of step ``step``."""

    def on_step_end(self, ctx: RunContext, step: int, metrics: dict) -> None:
        """Step ``step`` is done; ``metrics``: ``train_loss``, ``lr``, ``grad_norm``, ``step_time_ms``."""

    def on_log(self, ctx: RunContext, step: int, record: dict) -> None:
        """``record`` was written to ``metrics.jsonl`` (its ``kind``: train, eval or test)."""

    def on_eval(self, ctx: RunContext, step: int, metrics: dict) -> None:
        """A validation evaluation at ``step``: ``val_loss``, ``val_ppl`` (``val_accuracy`` for the CNN)."""

    def on_run_end(self, ctx: RunContext, result: dict) -> None:
        """The run finished; ``result`` (its summary row) may get fields added before it is written."""

    def state_dict(self) -> dict:
        """What must survive an interruption (saved in the run's checkpoint); default: nothing."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Take back what ``state_dict`` returned (called before ``on_run_start`` of a resumed run)."""


class LoggerCallback(Callback):
    """Sends every ``metrics.jsonl`` line to ``log(step, record)`` (TensorBoard, W&B; ``bench.runner``).

    Args:
        log: a callable ``log(step, record)``.
    """

    def __init__(self, log: Callable[[int, dict], object]):
        self.log = log

    def on_log(self, ctx: RunContext, step: int, record: dict) -> None:
        self.log(step, record)


class CallbackList:
    """Calls a hook on every callback in order, and keys their states for the checkpoint.

    Args:
        callbacks: the run's callbacks.
    """

    def __init__(self, callbacks: Iterable[Callback] = ()):
        self.callbacks = list(callbacks)
        for cb in self.callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks must be bench.callbacks.Callback instances, got {type(cb).__name__}")
        keys, counts = [], {}
        for cb in self.callbacks:
            base = cb.key or type(cb).__name__
            counts[base] = counts.get(base, 0) + 1
            keys.append(base if counts[base] == 1 else f"{base}.{counts[base]}")
        self.keys = keys

    def __bool__(self) -> bool:
        return bool(self.callbacks)

    def call(self, hook: str, *args) -> None:
        """``getattr(cb, hook)(*args)`` for every callback, in order."""
        for cb in self.callbacks:
            getattr(cb, hook)(*args)

    def optimizer_options(self, cfg) -> dict:
        """Every callback's extra optimizer keyword arguments; ``ValueError`` when two set the same one."""
        out: dict = {}
        for key, cb in zip(self.keys, self.callbacks):
            extra = cb.optimizer_options(cfg)
            clash = sorted(set(extra) & set(out))
            if clash:
                raise ValueError(f"callback {key} sets optimizer option(s) {clash} that another callback set already")
            out.update(extra)
        return out

    def state_dict(self) -> dict:
        """Key -> state of every callback that has one."""
        states = {k: cb.state_dict() for k, cb in zip(self.keys, self.callbacks)}
        return {k: s for k, s in states.items() if s}

    def load_state_dict(self, states: dict) -> None:
        """Give each callback its saved state (a callback without one keeps its fresh state)."""
        for k, cb in zip(self.keys, self.callbacks):
            if k in states:
                cb.load_state_dict(states[k])
