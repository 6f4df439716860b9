"""A finished run's row of ``summary.json``: what it reached, what it cost, how fast, and the end-of-run probes.

Every field is described in ``docs/bench.md`` (``summary.json``). ``train.train_run`` calls ``summary_row``
once the training steps are done; the final sharpness probe lives here too.
"""

from __future__ import annotations

import platform

import torch

from ..profiling import state_bytes, training_bytes
from .metrics import mean_std, median, peak_rss_bytes, quartiles, tensor_bytes

SHARPNESS_SEED = 4321  # the batch the final sharpness is measured on, the same for every run


def lowrank_summary(opt) -> dict:
    """Mean/min effective rank and mean reconstruction error, for optimizers that expose ``lowrank_stats``.

    Args:
        opt: the run's optimizer (``{}`` when it has no ``lowrank_stats()`` or no statistics yet).
    """
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


def timing_fields(stats: dict, load: dict) -> dict:
    """Step-time quartiles (after the timing warm-up) and the machine's load during the run.

    Args:
        stats: the run's running statistics (``step_times`` in seconds).
        load: ``metrics.load_summary(...)`` of the run.
    """
    q1, _, q3 = quartiles(stats["step_times"])
    return {"step_time_q1_ms": q1 * 1e3 if q1 is not None else None,
            "step_time_q3_ms": q3 * 1e3 if q3 is not None else None, **load}  # fmt: skip


def _memory_fields(ctx, params: list, grad_bytes: int, release: bool) -> dict:
    """Exact state, parameter and gradient bytes, the peak (CUDA allocator, or their sum on CPU), RSS."""
    device, opt = ctx.device, ctx.optimizer
    sbytes, pbytes, tbytes = state_bytes(opt), tensor_bytes(params), training_bytes(ctx.model, opt)
    if release:
        grad_bytes = tbytes["grads"]  # the largest single gradient: the others are freed as they are stepped
    numel = max(1, sum(p.numel() for p in params))
    return {
        "state_bytes": sbytes, "num_params": sum(p.numel() for p in params), "state_bytes_per_param": sbytes / numel,
        "param_bytes": pbytes, "grad_bytes": grad_bytes,
        "peak_memory_bytes": (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                              else pbytes + grad_bytes + sbytes),
        "peak_memory_kind": "cuda_allocator" if device.type == "cuda" else "params+grads+states",
        "correction_bytes": tbytes["corrections"],
        "training_bytes_per_param": (pbytes + grad_bytes + sbytes) / numel,
        "peak_rss_bytes": peak_rss_bytes(),
    }  # fmt: skip


def summary_row(ctx, final: dict, test: dict, *, diverged: bool, grad_bytes: int, rss_reset: bool, load: dict) -> dict:
    """The run's row of ``summary.json``.

    Args:
        ctx: the run's ``callbacks.RunContext`` (config, task, model, optimizer, running statistics).
        final: the final validation evaluation (``val_loss``, ``val_ppl``, ...; ``None`` values if diverged).
        test: the test evaluation (``test_loss``, ``test_ppl``, ...; ``None`` values without one).
        diverged: whether the run diverged.
        grad_bytes: the largest gradient bytes seen.
        rss_reset: whether the process's peak RSS was reset at the start of this run.
        load: the machine's load during the run (``metrics.load_summary``).
    """
    cfg, aux, task, opt = ctx.cfg, ctx.stats, ctx.task, ctx.optimizer
    params = [p for p in ctx.model.parameters() if p.requires_grad]
    step_ms = median(aux["step_times"])
    gn_mean, gn_std = mean_std(aux["grad_norms"])
    row = {
        "run_id": cfg.run_id, "optimizer": cfg.optimizer, "seed": cfg.seed, "settings": cfg.settings, "model": cfg.model,
        "data": cfg.data, "steps": aux["step"], "target_steps": cfg.steps,
        "final_train_loss": sum(aux["losses"]) / len(aux["losses"]) if aux["losses"] else None,
        "final_val_loss": final["val_loss"], "val_ppl": final["val_ppl"],
        "test_loss": test.get("test_loss"), "test_ppl": test.get("test_ppl"), "test_fraction": cfg.test_fraction,
        **_memory_fields(ctx, params, grad_bytes, cfg.grad_release),
        "param_dtype": cfg.param_dtype, "grad_release": cfg.grad_release, "peak_rss_is_per_run": rss_reset,
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
        "device": str(ctx.device), "torch": torch.__version__, "host": platform.node(),
    }  # fmt: skip
    row.update(timing_fields(aux, load))
    if cfg.sharpness_iters and not diverged:
        sharp = final_sharpness(task, ctx.model, cfg.sharpness_iters)
        row.update(sharpness=sharp["sharpness"], hessian_extreme_eigenvalue=sharp["extreme_eigenvalue"],
                   sharpness_converged=sharp["converged"])  # fmt: skip
    if "val_accuracy" in final:
        row["val_accuracy"] = final["val_accuracy"]
    if test.get("test_accuracy") is not None:
        row["test_accuracy"] = test["test_accuracy"]
    row.update(lowrank_summary(opt))
    return row
