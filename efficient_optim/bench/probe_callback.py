"""``StateProbeCallback``: an ``analysis.probe.StateProbe`` on a benchmark run, as a ``bench.callbacks.Callback``.

    train_run(cfg, run_dir, callbacks=[StateProbeCallback(every=25, sharpness_every=100)])

writes ``run_dir/probes.jsonl`` (the probe's records, parameters named as in ``model.named_parameters()``) and,
when the run finishes, ``run_dir/probe_overhead.json`` (seconds spent inside the probe). The probe is driven
from the run's optimizer-step callbacks: no hook is registered on the optimizer, none on torch globally.
A resumed run keeps its records up to the checkpoint and re-initializes the fp32 shadow from the stored
states there (the probe records that as ``shadow_start``); the overhead counted so far is checkpointed.
"""

from __future__ import annotations

import torch

from ..analysis.probe import StateProbe
from .callbacks import Callback, RunContext
from .metrics import write_json_atomic
from .run_summary import SHARPNESS_SEED


class StateProbeCallback(Callback):
    """Per-layer, per-state statistics and errors of the run's optimizer states (``analysis.probe``).

    Args:
        every: probe every this many steps (default 25).
        early: probe every one of the first ``early`` steps (default 10).
        lowrank_every: effective ranks and rank-r errors every this many steps (default 100; 0 = never).
        sharpness_every: top Hessian eigenvalue of the training loss every this many steps (default 0: never).
        sharpness_iters: power iterations of each sharpness measurement (default 10).
        filename: the records' file in the run folder (default ``probes.jsonl``).
    """

    key = "state_probe"

    def __init__(self, every: int = 25, early: int = 10, lowrank_every: int = 100, sharpness_every: int = 0,
                 sharpness_iters: int = 10, filename: str = "probes.jsonl"):  # fmt: skip
        self.every, self.early, self.lowrank_every = every, early, lowrank_every
        self.sharpness_every, self.sharpness_iters, self.filename = sharpness_every, sharpness_iters, filename
        self.probe: StateProbe | None = None
        self.overhead_before = 0.0  # seconds spent in the probe before the checkpoint this run resumed from

    def on_run_start(self, ctx: RunContext) -> None:
        named = ctx.named_parameters()
        fn = sharpness_probe(ctx, self.sharpness_iters) if self.sharpness_every else None
        self.probe = StateProbe(
            ctx.optimizer, named, path=ctx.run_dir / self.filename, every=self.every, early=self.early,
            lowrank_every=self.lowrank_every, sharpness_fn=fn, sharpness_every=self.sharpness_every if fn else 0,
            clip=ctx.cfg.clip if ctx.cfg.clip > 0 else None,
        )  # fmt: skip

    def on_before_optimizer_step(self, ctx: RunContext, step: int) -> None:
        self.probe.pre_step()

    def on_after_optimizer_step(self, ctx: RunContext, step: int) -> None:
        self.probe.post_step()

    @property
    def overhead_s(self) -> float:
        """Seconds spent inside the probe over the whole run (resumed sessions included)."""
        return self.overhead_before + (self.probe.overhead_s if self.probe is not None else 0.0)

    def on_run_end(self, ctx: RunContext, result: dict) -> None:
        write_json_atomic(ctx.run_dir / "probe_overhead.json", {"probe_overhead_s": self.overhead_s})

    def state_dict(self) -> dict:
        return {"overhead_s": self.overhead_s}

    def load_state_dict(self, state: dict) -> None:
        self.overhead_before = float(state.get("overhead_s", 0.0))


def sharpness_probe(ctx: RunContext, iters: int):
    """A function that measures the top Hessian eigenvalue of the training loss on one fixed batch (the one the
    final sharpness uses) at the live parameters; its result is a probe's ``sharpness`` record.

    Args:
        ctx: the run (its task draws the batch and computes the loss, on its model).
        iters: power iterations (``analysis.sharpness.hessian_top_eigenvalue``).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ..analysis.sharpness import hessian_top_eigenvalue

    batch = ctx.task.train_batch(torch.Generator().manual_seed(SHARPNESS_SEED))
    params = [p for _, p in ctx.named_parameters()]

    def loss_fn():
        with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention kernel has no double backward
            return ctx.task.loss(ctx.model, batch)

    return lambda: hessian_top_eigenvalue(loss_fn, params, iters=iters)
