"""The training loop of one benchmark run: resumable, measured, honest about divergence, open to callbacks.

``train_run(cfg, run_dir, callbacks=...)`` trains ``cfg.model`` with ``cfg.optimizer`` and writes into ``run_dir``:

- ``config.json``: the settings (a resumed run must have the same ones);
- ``metrics.jsonl``: a ``train`` line every ``log_every`` steps (loss, learning rate, gradient norm, whether
  it was clipped, update-to-parameter ratio, step and optimizer times), an ``eval`` line per validation
  evaluation and, at the end, one ``test`` line (the held-out test split, ``RunConfig.test_fraction``);
- ``checkpoint.pt`` every ``checkpoint_every`` steps (model, optimizer, schedule, batch-order generator,
  RNG, the running statistics and every callback's state), removed once the run has finished;
- ``result.json``: the run's row of ``summary.json`` (see ``docs/bench.md`` for every field).

Probes, controllers and loggers attach as ``bench.callbacks.Callback`` objects (their hooks and the order
they are called in: ``bench.callbacks``). A run *diverges* when the loss is NaN/Inf or exceeds twice the
first step's loss: it is recorded (``diverged: true``, ``diverged_at_step``) and stops; it does not crash
the matrix.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..optim.gradient_release import enable_gradient_release
from ..registry import create_optimizer
from .callbacks import CallbackList, LoggerCallback, RunContext
from .config import RunConfig
from .metrics import (
    MetricsLog,
    load_snapshot,
    load_summary,
    reset_peak_rss,
    tensor_bytes,
    update_ratio,
    write_json_atomic,
)
from .run_summary import SHARPNESS_SEED, final_sharpness, lowrank_summary, summary_row  # noqa: F401  (re-exported)
from .tasks import build_task

DIVERGENCE_FACTOR = 2.0
TIMING_WARMUP_STEPS = 3  # first steps (kernel builds, allocator warm-up) are timed separately


class ConfigMismatch(ValueError):
    """A run folder holds a run with other settings than the ones asked for."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cuda`` without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for, but no CUDA device is available (use --device cpu)")
    return torch.device(name)


def lr_factor(step: int, cfg: RunConfig) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_lr_ratio`` at ``cfg.steps`` (``RunConfig.lr_factor``)."""
    return cfg.lr_factor(step)


def _check_config(run_dir: Path, cfg: RunConfig) -> None:
    path = run_dir / "config.json"
    if path.is_file():
        # a setting added after the folder was written reads as what that run did (RunConfig.from_dict)
        old = RunConfig.from_dict(json.loads(path.read_text())).to_dict()
        new = cfg.to_dict()
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
            raise ConfigMismatch(f"{run_dir} holds a run with other settings ({details}); use another --out")
    else:
        write_json_atomic(path, cfg.to_dict())


def _set_optimizer_seed(opt: torch.optim.Optimizer, cfg: RunConfig, spec_kwargs: dict) -> None:
    # our optimizers seed stochastic rounding per group; tie it to the run's seed unless the spec sets it
    if "seed" not in spec_kwargs:
        for group in opt.param_groups:
            if "seed" in group:
                group["seed"] = cfg.seed


def _fresh_stats() -> dict:
    return {"step": 0, "initial_loss": None, "losses": [], "grad_norms": [], "clipped": 0, "step_times": [],
            "opt_times": [], "warmup_times": [], "update_ratios": [], "evals": [], "steps_to_target": None,
            "diverged_at_step": None, "skipped_steps": 0, "resumed_from": []}  # fmt: skip


@dataclass
class _Loop:
    """The run's pieces and the per-call state of the loop (what is not saved in the checkpoint)."""

    ctx: RunContext
    callbacks: CallbackList
    params: list
    release: object
    generator: torch.Generator
    log: MetricsLog
    checkpoint: Path
    autocast: object
    grad_bytes: int = 0
    since_log: list = field(default_factory=list)

    @property
    def clip(self) -> float:
        return self.ctx.cfg.clip if self.ctx.cfg.clip > 0 else float("inf")


def _setup(cfg: RunConfig, run_dir: Path, callbacks: CallbackList) -> _Loop:
    """Build task, model, optimizer and schedule; resume them (and the callbacks' states) from a checkpoint."""
    device = resolve_device(cfg.device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    task = build_task(cfg, device)
    model = task.build_model().to(device=device, dtype=getattr(torch, cfg.param_dtype))
    params = [p for p in model.parameters() if p.requires_grad]
    name, kwargs = cfg.optimizer_kwargs()
    extra = callbacks.optimizer_options(cfg)
    clash = sorted(set(extra) & set(kwargs))
    if clash:
        raise ValueError(f"optimizer spec {cfg.optimizer!r} sets {clash}, which a callback of this run sets too")
    opt = create_optimizer(name, model, **kwargs, **extra)
    _set_optimizer_seed(opt, cfg, kwargs)
    release = enable_gradient_release(model, opt) if cfg.grad_release else None
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    gen = torch.Generator().manual_seed(cfg.seed)
    ctx = RunContext(cfg, run_dir, device, task, model, opt, sched, _fresh_stats())
    loop = _Loop(ctx, callbacks, params, release, gen, MetricsLog(run_dir / "metrics.jsonl"), run_dir / "checkpoint.pt", autocast)
    if loop.checkpoint.is_file():
        ckpt = torch.load(loop.checkpoint, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        gen.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["rng"])
        ctx.stats = json.loads(ckpt["aux"])
        ctx.stats["resumed_from"].append(ctx.stats["step"])
        callbacks.load_state_dict(ckpt.get("callbacks", {}))
    loop.log.truncate_after(ctx.stats["step"])
    return loop


def _save_checkpoint(loop: _Loop) -> None:
    ctx = loop.ctx
    ckpt = {"model": ctx.model.state_dict(), "optimizer": ctx.optimizer.state_dict(), "scheduler": ctx.scheduler.state_dict(),
            "generator": loop.generator.get_state(), "rng": torch.get_rng_state(), "aux": json.dumps(ctx.stats)}  # fmt: skip
    if loop.callbacks:
        ckpt["callbacks"] = loop.callbacks.state_dict()
    tmp = loop.checkpoint.with_suffix(".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(loop.checkpoint)


def _write(loop: _Loop, record: dict) -> None:
    """A ``metrics.jsonl`` line, shown to the callbacks' ``on_log``."""
    loop.log.write(record)
    loop.callbacks.call("on_log", loop.ctx, record["step"], record)


def _evaluate(loop: _Loop, step: int) -> dict:
    """A validation evaluation at ``step``: logged, kept, shown to ``on_eval``, checked against the target."""
    ctx = loop.ctx
    ev = {"kind": "eval", "step": step, **ctx.task.evaluate(ctx.model, loop.autocast)}
    ctx.stats["evals"].append(ev)
    _write(loop, ev)
    loop.callbacks.call("on_eval", ctx, step, ev)
    if ctx.cfg.target_ppl and ctx.stats["steps_to_target"] is None and ev["val_ppl"] <= ctx.cfg.target_ppl:
        ctx.stats["steps_to_target"] = step
    return ev


def _forward_backward(loop: _Loop) -> tuple[float, float]:
    """The step's loss (summed over micro-batches) and the gradient norm before clipping (NaN with release)."""
    cfg, task, model = loop.ctx.cfg, loop.ctx.task, loop.ctx.model
    loss_value = 0.0
    for _ in range(cfg.grad_accum):
        with loop.autocast():
            loss = task.loss(model, task.train_batch(loop.generator)) / cfg.grad_accum
        loss.backward()
        loss_value += loss.item()
    if loop.release is not None:  # the parameters were stepped during backward; their gradients are gone
        return loss_value, float("nan")
    if loop.ctx.gradient_accumulator is not None:  # folded into compressed buffers; clipped when stepped
        return loss_value, float("nan")
    loop.grad_bytes = max(loop.grad_bytes, tensor_bytes(p.grad for p in loop.params))
    return loss_value, float(torch.nn.utils.clip_grad_norm_(loop.params, loop.clip))


def _optimizer_step(loop: _Loop, step: int, grad_norm: float) -> float:
    """Step the optimizer (through the callbacks' gradient accumulator when one is installed); the gradient
    norm before clipping (the accumulator measures it from its buffers)."""
    ctx = loop.ctx
    if loop.release is None:
        loop.callbacks.call("on_before_optimizer_step", ctx, step)
        if ctx.gradient_accumulator is not None:
            grad_norm = ctx.gradient_accumulator.step(ctx.optimizer, max_norm=ctx.cfg.clip)
        else:
            ctx.optimizer.step()
        loop.callbacks.call("on_after_optimizer_step", ctx, step)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    return grad_norm


def _record_step(loop: _Loop, step: int, loss_value: float, grad_norm: float, step_s: float, opt_s: float) -> None:
    """Keep the step's timings, loss and gradient norm in the running statistics."""
    aux = loop.ctx.stats
    first_step = aux["resumed_from"][-1] if aux["resumed_from"] else 0
    if step - first_step < TIMING_WARMUP_STEPS:
        aux["warmup_times"].append(step_s)
    else:
        aux["step_times"].append(step_s)
        aux["opt_times"].append(opt_s)
    window = max(1, min(20, loop.ctx.cfg.steps // 10))
    aux["losses"] = (aux["losses"] + [loss_value])[-window:]
    if loop.release is None:
        aux["grad_norms"].append(grad_norm)
        aux["clipped"] += int(grad_norm > loop.clip)
    loop.since_log.append(loss_value)
    aux["step"] = step + 1


def _log_train(loop: _Loop, step: int, before: list, grad_norm: float, step_s: float, opt_s: float) -> None:
    ratio = update_ratio(before, loop.params)
    loop.ctx.stats["update_ratios"].append(ratio)
    record = {"kind": "train", "step": step, "train_loss": sum(loop.since_log) / len(loop.since_log),
              "lr": loop.ctx.scheduler.get_last_lr()[0], "grad_norm": grad_norm if loop.release is None else None,
              "clipped": grad_norm > loop.clip,
              "update_ratio": ratio, "step_time_ms": step_s * 1e3, "opt_time_ms": opt_s * 1e3}  # fmt: skip
    record.update(lowrank_summary(loop.ctx.optimizer))
    _write(loop, record)
    loop.since_log = []


def _train_steps(loop: _Loop, progress, interrupt_at: int | None) -> bool:
    """Run the remaining steps; ``True`` when the run diverged."""
    ctx, cfg, aux = loop.ctx, loop.ctx.cfg, loop.ctx.stats
    for step in range(aux["step"], cfg.steps):
        log_step = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps
        before = [p.detach().clone() for p in loop.params] if log_step else None
        t0 = time.perf_counter()
        loss_value, grad_norm = _forward_backward(loop)
        if aux["initial_loss"] is None:
            aux["initial_loss"] = loss_value
        if not math.isfinite(loss_value) or loss_value > DIVERGENCE_FACTOR * aux["initial_loss"]:
            aux["diverged_at_step"] = step + 1
            _write(loop, {"kind": "diverged", "step": step + 1, "train_loss": loss_value if math.isfinite(loss_value) else None})
            return True
        t1 = time.perf_counter()
        grad_norm = _optimizer_step(loop, step + 1, grad_norm)
        t2 = time.perf_counter()
        ctx.scheduler.step()
        ctx.optimizer.zero_grad(set_to_none=True)
        step_s, opt_s = time.perf_counter() - t0, t2 - t1
        _record_step(loop, step, loss_value, grad_norm, step_s, opt_s)
        if log_step:
            _log_train(loop, step + 1, before, grad_norm, step_s, opt_s)
        loop.callbacks.call("on_step_end", ctx, step + 1, {"train_loss": loss_value, "lr": ctx.scheduler.get_last_lr()[0],
                            "grad_norm": grad_norm if loop.release is None else None, "step_time_ms": step_s * 1e3})  # fmt: skip
        if cfg.eval_interval and (step + 1) % cfg.eval_interval == 0 and step + 1 < cfg.steps:
            _evaluate(loop, step + 1)
        if progress is not None:
            progress.update(1)
            progress.set_postfix_str(f"{cfg.optimizer} s{cfg.seed} loss {loss_value:.3f}")
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            _save_checkpoint(loop)
        if interrupt_at is not None and step + 1 >= interrupt_at:
            raise KeyboardInterrupt(f"interrupted after step {step + 1} (testing hook)")
    return False


def _final_evaluations(loop: _Loop, diverged: bool) -> tuple[dict, dict]:
    """The final validation evaluation and the test evaluation (``None`` values when diverged or no test split)."""
    ctx = loop.ctx
    if diverged:
        return {"val_loss": None, "val_ppl": None}, {"test_loss": None, "test_ppl": None}
    final = {k: v for k, v in _evaluate(loop, ctx.stats["step"]).items() if k not in ("kind", "step")}
    if not ctx.task.has_test:
        return final, {"test_loss": None, "test_ppl": None}
    test = ctx.task.evaluate(ctx.model, loop.autocast, split="test")
    _write(loop, {"kind": "test", "step": ctx.stats["step"], **test})
    return final, test


def _config_callbacks(cfg: RunConfig) -> list:
    """The callbacks the settings themselves ask for: gradient compression and a controller
    (``RunConfig.grad_compression`` / ``controller``; ``bench.mango_callback``)."""
    if cfg.grad_compression is None and cfg.controller is None:
        return []
    from .mango_callback import GradientControlCallback

    return [GradientControlCallback.from_config(cfg)]


def train_run(cfg: RunConfig, run_dir: Path, *, callbacks=(), loggers=(), progress=None, interrupt_at: int | None = None) -> dict:
    """Train one run (or resume it from ``run_dir/checkpoint.pt``) and return its summary row.

    Args:
        cfg: the run's settings.
        run_dir: its folder (created). A finished run's ``result.json`` is returned as is.
        callbacks: ``bench.callbacks.Callback`` objects (probes, controllers, loggers), called in this order
            (default none).
        loggers: callables ``log(step, record)`` given every ``metrics.jsonl`` line (TensorBoard, W&B;
            ``bench.runner``); each becomes a ``LoggerCallback`` after ``callbacks`` (default none).
        progress: an object with ``update(n)`` and ``set_postfix_str(s)`` (a tqdm bar), or ``None``.
        interrupt_at: testing hook: raise ``KeyboardInterrupt`` after this many steps, as a user would.
    """
    cfg.validate()
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_config(run_dir, cfg)
    result_path = run_dir / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    cbs = CallbackList([*_config_callbacks(cfg), *callbacks, *(LoggerCallback(log) for log in loggers)])
    loop = _setup(cfg, run_dir, cbs)
    ctx = loop.ctx
    cbs.call("on_run_start", ctx)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    rss_reset = reset_peak_rss()
    load_start = load_snapshot()
    diverged = _train_steps(loop, progress, interrupt_at)
    load = load_summary(load_start, load_snapshot(), torch.get_num_threads())
    final, test = _final_evaluations(loop, diverged)
    row = summary_row(ctx, final, test, diverged=diverged, grad_bytes=loop.grad_bytes, rss_reset=rss_reset, load=load)
    cbs.call("on_run_end", ctx, row)
    write_json_atomic(result_path, row)
    loop.checkpoint.unlink(missing_ok=True)
    return row
