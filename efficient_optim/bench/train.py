"""The training loop of one benchmark run: resumable, measured, and honest about divergence.

``train_run(cfg, run_dir)`` trains ``cfg.model`` with ``cfg.optimizer`` and writes into ``run_dir``:

- ``config.json``: the settings (a resumed run must have the same ones);
- ``metrics.jsonl``: a ``train`` line every ``log_every`` steps (loss, learning rate, gradient norm, whether
  it was clipped, update-to-parameter ratio, step and optimizer times) and an ``eval`` line per evaluation;
- ``checkpoint.pt`` every ``checkpoint_every`` steps (model, optimizer, schedule, batch-order generator,
  RNG and the running statistics), removed once the run has finished;
- ``result.json``: the run's row of ``summary.json`` (see ``docs/bench.md`` for every field).

A run *diverges* when the loss is NaN/Inf or exceeds twice the first step's loss: it is recorded
(``diverged: true``, ``diverged_at_step``) and stops; it does not crash the matrix.
"""

from __future__ import annotations

import contextlib
import math
import platform
import time
from pathlib import Path

import torch

from ..optim.gradient_release import enable_gradient_release
from ..profiling import state_bytes, training_bytes
from ..registry import create_optimizer
from .config import RunConfig
from .metrics import (
    MetricsLog,
    load_snapshot,
    load_summary,
    mean_std,
    median,
    peak_rss_bytes,
    quartiles,
    reset_peak_rss,
    tensor_bytes,
    update_ratio,
    write_json_atomic,
)
from .tasks import build_task

DIVERGENCE_FACTOR = 2.0
TIMING_WARMUP_STEPS = 3  # first steps (kernel builds, allocator warm-up) are timed separately
SHARPNESS_SEED = 4321  # the batch the final sharpness is measured on, the same for every run


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
    """Linear warm-up to 1, then cosine decay to ``min_lr_ratio`` at ``cfg.steps``."""
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, cfg.steps // 20)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.steps - warmup))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _check_config(run_dir: Path, cfg: RunConfig) -> None:
    import json

    path = run_dir / "config.json"
    if path.is_file():
        old = json.loads(path.read_text())
        new = cfg.to_dict()
        # a setting added after the folder was written counts as unchanged while it keeps its default
        defaults = RunConfig().to_dict()
        old.update({k: defaults[k] for k in set(new) - set(old)})
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


def _lowrank_summary(opt) -> dict:
    """Mean/min effective rank and mean reconstruction error, for optimizers that expose ``lowrank_stats``."""
    stats_fn = getattr(opt, "lowrank_stats", None)
    if stats_fn is None:
        return {}
    stats = list(stats_fn().values())
    if not stats:
        return {}
    out = {}
    ranks = [s["effective_rank"] for s in stats if s.get("effective_rank") is not None]
    errors = [s["reconstruction_error"] for s in stats if s.get("reconstruction_error") is not None]
    if ranks:
        out["effective_rank_mean"], out["effective_rank_min"] = sum(ranks) / len(ranks), min(ranks)
    if errors:
        out["reconstruction_error_mean"] = sum(errors) / len(errors)
    failures = [s.get("svd_failures", 0) for s in stats]
    out["svd_failures"] = int(sum(failures))
    return out


def final_sharpness(task, model: torch.nn.Module, iters: int) -> dict:
    """Top (most positive) Hessian eigenvalue of the training loss on one fixed batch, at the current parameters.

    Power iteration finds the eigenvalue of largest magnitude, which away from a minimum can be negative; then
    a second pass on ``H + |λ| I`` (the loss plus ``|λ|/2 · ||θ - θ_now||²``, which has that Hessian) finds
    the top positive curvature, the usual "sharpness".

    Args:
        task: the run's task (``bench.tasks``): draws the batch and computes the loss.
        model: the trained model (left in the training mode it was in).
        iters: power iterations per pass (``analysis.sharpness.hessian_top_eigenvalue``; each ~two backward passes).

    Returns:
        ``{"sharpness", "extreme_eigenvalue", "converged"}``.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ..analysis.sharpness import hessian_top_eigenvalue

    batch = task.train_batch(torch.Generator().manual_seed(SHARPNESS_SEED))
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params]
    was_training = model.training
    model.eval()
    try:
        with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention kernel has no double backward
            first = hessian_top_eigenvalue(lambda: task.loss(model, batch), params, iters=iters)
            if first["eigenvalue"] >= 0:
                return {"sharpness": first["eigenvalue"], "extreme_eigenvalue": first["eigenvalue"], "converged": first["converged"]}
            shift = -first["eigenvalue"]

            def shifted():
                return task.loss(model, batch) + 0.5 * shift * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))

            second = hessian_top_eigenvalue(shifted, params, iters=iters)
    finally:
        model.train(was_training)
    return {"sharpness": second["eigenvalue"] - shift, "extreme_eigenvalue": first["eigenvalue"],
            "converged": first["converged"] and second["converged"]}  # fmt: skip


def _timing_fields(aux: dict, load: dict) -> dict:
    """Step-time quartiles (after the timing warm-up) and the machine's load during the run."""
    q1, _, q3 = quartiles(aux["step_times"])
    return {"step_time_q1_ms": q1 * 1e3 if q1 is not None else None,
            "step_time_q3_ms": q3 * 1e3 if q3 is not None else None, **load}  # fmt: skip


def train_run(cfg: RunConfig, run_dir: Path, *, loggers=(), progress=None, interrupt_at: int | None = None) -> dict:
    """Train one run (or resume it from ``run_dir/checkpoint.pt``) and return its summary row.

    Args:
        cfg: the run's settings.
        run_dir: its folder (created). A finished run's ``result.json`` is returned as is.
        loggers: callables ``log(step, metrics_dict)`` (TensorBoard, W&B); see ``bench.loggers``.
        progress: an object with ``update(n)`` and ``set_postfix_str(s)`` (a tqdm bar), or ``None``.
        interrupt_at: testing hook: raise ``KeyboardInterrupt`` after this many steps, as a user would.
    """
    import json

    cfg.validate()
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_config(run_dir, cfg)
    result_path = run_dir / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())

    device = resolve_device(cfg.device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    task = build_task(cfg, device)
    model = task.build_model().to(device=device, dtype=getattr(torch, cfg.param_dtype))
    params = [p for p in model.parameters() if p.requires_grad]
    name, kwargs = cfg.optimizer_kwargs()
    opt = create_optimizer(name, model, **kwargs)
    _set_optimizer_seed(opt, cfg, kwargs)
    release = enable_gradient_release(model, opt) if cfg.grad_release else None
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    gen = torch.Generator().manual_seed(cfg.seed)
    log = MetricsLog(run_dir / "metrics.jsonl")
    ckpt_path = run_dir / "checkpoint.pt"

    aux = {"step": 0, "initial_loss": None, "losses": [], "grad_norms": [], "clipped": 0, "step_times": [],
           "opt_times": [], "warmup_times": [], "update_ratios": [], "evals": [], "steps_to_target": None,
           "diverged_at_step": None, "skipped_steps": 0, "resumed_from": []}  # fmt: skip
    if ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        gen.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["rng"])
        aux = json.loads(ckpt["aux"])
        aux["resumed_from"].append(aux["step"])
    log.truncate_after(aux["step"])

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_reset = reset_peak_rss()
    grad_bytes = 0
    window = max(1, min(20, cfg.steps // 10))
    since_log: list[float] = []
    diverged = False
    clip = cfg.clip if cfg.clip > 0 else float("inf")
    eval_every = cfg.eval_interval
    load_start = load_snapshot()

    for step in range(aux["step"], cfg.steps):
        log_step = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps
        before = [p.detach().clone() for p in params] if log_step else None
        t0 = time.perf_counter()
        loss_value = 0.0
        for _ in range(cfg.grad_accum):
            with autocast():
                loss = task.loss(model, task.train_batch(gen)) / cfg.grad_accum
            loss.backward()
            loss_value += loss.item()
        if release is None:
            grad_bytes = max(grad_bytes, tensor_bytes(p.grad for p in params))
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        else:  # the parameters were stepped during backward; their gradients are gone
            grad_norm = float("nan")
        if aux["initial_loss"] is None:
            aux["initial_loss"] = loss_value
        if not math.isfinite(loss_value) or loss_value > DIVERGENCE_FACTOR * aux["initial_loss"]:
            diverged = True
            aux["diverged_at_step"] = step + 1
            log.write({"kind": "diverged", "step": step + 1, "train_loss": loss_value if math.isfinite(loss_value) else None})
            break
        t1 = time.perf_counter()
        if release is None:
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t2 = time.perf_counter()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step_s, opt_s = time.perf_counter() - t0, t2 - t1
        first_step = aux["resumed_from"][-1] if aux["resumed_from"] else 0
        if step - first_step < TIMING_WARMUP_STEPS:
            aux["warmup_times"].append(step_s)
        else:
            aux["step_times"].append(step_s)
            aux["opt_times"].append(opt_s)
        aux["losses"] = (aux["losses"] + [loss_value])[-window:]
        if release is None:
            aux["grad_norms"].append(grad_norm)
            aux["clipped"] += int(grad_norm > clip)
        since_log.append(loss_value)
        aux["step"] = step + 1

        if log_step:
            ratio = update_ratio(before, params)
            aux["update_ratios"].append(ratio)
            record = {"kind": "train", "step": step + 1, "train_loss": sum(since_log) / len(since_log),
                      "lr": sched.get_last_lr()[0], "grad_norm": grad_norm if release is None else None,
                      "clipped": grad_norm > clip,
                      "update_ratio": ratio, "step_time_ms": step_s * 1e3, "opt_time_ms": opt_s * 1e3}  # fmt: skip
            record.update(_lowrank_summary(opt))
            log.write(record)
            for logger in loggers:
                logger(step + 1, record)
            since_log = []
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < cfg.steps:
            ev = {"kind": "eval", "step": step + 1, **task.evaluate(model, autocast)}
            aux["evals"].append(ev)
            log.write(ev)
            for logger in loggers:
                logger(step + 1, ev)
            if cfg.target_ppl and aux["steps_to_target"] is None and ev["val_ppl"] <= cfg.target_ppl:
                aux["steps_to_target"] = step + 1
        if progress is not None:
            progress.update(1)
            progress.set_postfix_str(f"{cfg.optimizer} s{cfg.seed} loss {loss_value:.3f}")
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "generator": gen.get_state(), "rng": torch.get_rng_state(), "aux": json.dumps(aux)}  # fmt: skip
            tmp = ckpt_path.with_suffix(".tmp")
            torch.save(ckpt, tmp)
            tmp.replace(ckpt_path)
        if interrupt_at is not None and step + 1 >= interrupt_at:
            raise KeyboardInterrupt(f"interrupted after step {step + 1} (testing hook)")

    load = load_summary(load_start, load_snapshot(), torch.get_num_threads())
    final = task.evaluate(model, autocast) if not diverged else {"val_loss": None, "val_ppl": None}
    if not diverged:
        final_eval = {"kind": "eval", "step": aux["step"], **final}
        log.write(final_eval)
        aux["evals"].append(final_eval)
        if cfg.target_ppl and aux["steps_to_target"] is None and final["val_ppl"] <= cfg.target_ppl:
            aux["steps_to_target"] = aux["step"]
    sbytes = state_bytes(opt)
    pbytes = tensor_bytes(params)
    tbytes = training_bytes(model, opt)
    if release is not None:
        grad_bytes = tbytes["grads"]  # the largest single gradient: the others are freed as they are stepped
    step_ms = median(aux["step_times"])
    gn_mean, gn_std = mean_std(aux["grad_norms"])
    row = {
        "run_id": cfg.run_id, "optimizer": cfg.optimizer, "seed": cfg.seed, "settings": cfg.settings, "model": cfg.model,
        "data": cfg.data, "steps": aux["step"], "target_steps": cfg.steps,
        "final_train_loss": sum(aux["losses"]) / len(aux["losses"]) if aux["losses"] else None,
        "final_val_loss": final["val_loss"], "val_ppl": final["val_ppl"],
        "state_bytes": sbytes, "num_params": sum(p.numel() for p in params),
        "state_bytes_per_param": sbytes / max(1, sum(p.numel() for p in params)),
        "param_bytes": pbytes, "grad_bytes": grad_bytes,
        "peak_memory_bytes": (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                              else pbytes + grad_bytes + sbytes),
        "peak_memory_kind": "cuda_allocator" if device.type == "cuda" else "params+grads+states",
        "correction_bytes": tbytes["corrections"], "param_dtype": cfg.param_dtype, "grad_release": cfg.grad_release,
        "training_bytes_per_param": (pbytes + grad_bytes + sbytes) / max(1, sum(p.numel() for p in params)),
        "peak_rss_bytes": peak_rss_bytes(), "peak_rss_is_per_run": rss_reset,
        "step_time_ms": step_ms * 1e3 if step_ms else None,
        "optimizer_step_time_ms": median(aux["opt_times"]) * 1e3 if aux["opt_times"] else None,
        "warmup_time_s": sum(aux["warmup_times"]),
        "tokens_per_s": task.items_per_batch * cfg.grad_accum / step_ms if step_ms else None,
        "throughput_unit": task.unit,
        "grad_norm_mean": gn_mean, "grad_norm_std": gn_std,
        "clip_fraction": aux["clipped"] / max(1, len(aux["grad_norms"])),
        "update_ratio_mean": mean_std(aux["update_ratios"])[0],
        "steps_to_target": aux["steps_to_target"], "target_ppl": cfg.target_ppl,
        "diverged": diverged, "diverged_at_step": aux["diverged_at_step"],
        "initial_loss": aux["initial_loss"],
        "skipped_steps": getattr(opt, "skipped_steps", 0),
        "resumed_from_steps": aux["resumed_from"],
        "device": str(device), "torch": torch.__version__, "host": platform.node(),
    }  # fmt: skip
    row.update(_timing_fields(aux, load))
    if cfg.sharpness_iters and not diverged:
        sharp = final_sharpness(task, model, cfg.sharpness_iters)
        row.update(sharpness=sharp["sharpness"], hessian_extreme_eigenvalue=sharp["extreme_eigenvalue"],
                   sharpness_converged=sharp["converged"])  # fmt: skip
    if "val_accuracy" in final:
        row["val_accuracy"] = final["val_accuracy"]
    row.update(_lowrank_summary(opt))
    write_json_atomic(result_path, row)
    ckpt_path.unlink(missing_ok=True)
    return row
