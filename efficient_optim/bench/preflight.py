"""Checks that a planned matrix of runs can run, made once before the first run starts.

Every command that trains (``effopt bench``, ``suite``, ``characterize``, ``decompose``) calls ``preflight``
after planning and before it prints its header or creates its output folder, so a bad input fails once,
as a ``UsageError`` (``error: ...``, exit code 2), and leaves nothing behind. Checked:

- the device (``cuda`` on a machine without one), and CUDA-only optimizers on a CPU run;
- the model preset and its overrides, and the data: readable UTF-8 text, long enough for one sequence in
  each split (this loads the corpus and its cached token arrays, as the first run would);
- each optimizer spec, built once on the model's parameters allocated on the ``meta`` device (no memory):
  a wrong value or an unknown keyword is reported with the spec that holds it;
- ``--log`` backends are installed;
- the output folder: creatable and writable, not a file, not holding runs unless ``--resume``, and on
  ``--resume`` holding runs planned with the same settings.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

import torch

from ..registry import create_optimizer, optimizer_entry
from .config import RunConfig
from .options import UsageError

LOG_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_device(name: str) -> torch.device:
    """The device ``name`` resolves to (``auto``: CUDA when available); ``UsageError`` when it is absent."""
    from .train import resolve_device

    try:
        device = resolve_device(name)
    except RuntimeError as exc:
        raise UsageError(str(exc)) from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"device {name!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def _task_key(cfg: RunConfig) -> tuple:
    return (cfg.model, cfg.layers, cfg.width, cfg.heads, cfg.context, cfg.data, cfg.tokenizer, cfg.vocab_size,
            cfg.param_dtype, cfg.test_fraction)


def check_task(cfg: RunConfig) -> torch.nn.Module:
    """Load ``cfg``'s data and shape its model; returns the model with its parameters on ``meta``.

    ``UsageError`` for an unknown preset, bad overrides, missing or non-text data, or a corpus split shorter
    than one sequence.
    """
    from .tasks import build_task

    try:
        task = build_task(dataclasses.replace(cfg, device="cpu"), torch.device("cpu"))
        with torch.device("meta"):
            return task.build_model().to(dtype=getattr(torch, cfg.param_dtype))
    except (ValueError, RuntimeError, OSError) as exc:
        raise UsageError(str(exc)) from None


def check_optimizer(cfg: RunConfig, model: torch.nn.Module, device: torch.device) -> None:
    """Build ``cfg``'s optimizer once on ``model`` (parameters on ``meta``); ``UsageError`` naming the spec.

    Args:
        cfg: the run (its spec, learning rate, weight decay and ``grad_release``).
        model: the run's model with ``meta`` parameters (``check_task``).
        device: the run's device (a CUDA-only optimizer needs a CUDA device).
    """
    name, kwargs = cfg.optimizer_kwargs()
    if optimizer_entry(name).cuda_only and device.type != "cuda":
        raise UsageError(f"optimizer {name!r} runs on CUDA only, and this run's device is {device.type}")
    try:
        opt = create_optimizer(name, model, **kwargs)
        if cfg.grad_release:
            from ..optim.gradient_release import enable_gradient_release

            enable_gradient_release(model, opt).remove()
    except (ValueError, TypeError, ImportError) as exc:
        raise UsageError(f"optimizer {cfg.optimizer!r}: {exc}") from None
    except (RuntimeError, NotImplementedError):
        pass  # a limit of meta tensors, not of the spec: the run itself will tell


def check_loggers(names: tuple[str, ...]) -> None:
    """``UsageError`` when a ``--log`` backend's package is not installed."""
    for n in names:
        package = LOG_PACKAGES.get(n)
        if package is None:
            raise UsageError(f"unknown --log {n!r}; choose tensorboard, wandb or both")
        if importlib.util.find_spec(package) is None:
            raise UsageError(f"--log {n} needs the {package} package: pip install {package}")


def check_output(out: Path, *, resume: bool = False, marker: str | None = "plan.json") -> None:
    """``UsageError`` when ``out`` cannot hold the runs. Creates nothing.

    Args:
        out: the output folder (may not exist yet).
        resume: the runs in ``out`` are to be continued (default False).
        marker: the file whose presence means ``out`` already holds runs (refused without ``resume``);
            ``None``: no such check (a command that rewrites its outputs).
    """
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    if out.is_dir():
        if marker and (out / marker).is_file() and not resume:
            raise UsageError(f"{out} already holds runs: pass --resume to continue them, or choose another --out")
        if not os.access(out, os.W_OK | os.X_OK):
            raise UsageError(f"--out {out} is not writable")
        return
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"--out {out} cannot be created: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out} cannot be created: {parent} is not writable")


def check_resume(plan: list[RunConfig], out: Path) -> None:
    """``UsageError`` when a run of ``plan`` was planned in ``out`` with other settings (``--resume``).

    Only the settings ``plan.json`` holds are compared: a setting added since the folder was written keeps,
    for the runs planned there, the value they ran with (``RunConfig.from_dict``).
    """
    import json

    if not (out / "plan.json").is_file():
        return
    try:
        stored = json.loads((out / "plan.json").read_text())["runs"]
        old = {RunConfig.from_dict(d).run_id: d for d in stored}
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{out / 'plan.json'} cannot be read ({exc}); choose another --out") from None
    for cfg in plan:
        before, new = old.get(cfg.run_id, {}), cfg.to_dict()
        diff = sorted(k for k in before if before[k] != new.get(k))
        if diff:
            details = ", ".join(f"{k}: {before[k]!r} -> {new.get(k)!r}" for k in diff)
            raise UsageError(f"{out / cfg.run_id} was planned with other settings ({details}); resume with the "
                             "same options, or choose another --out")  # fmt: skip


def preflight(plan: list[RunConfig], out: Path | None = None, *, resume: bool = False, log: tuple[str, ...] = (),
              marker: str | None = "plan.json") -> None:  # fmt: skip
    """Check everything ``plan`` needs (see the module docstring); ``UsageError`` at the first problem.

    Args:
        plan: the runs.
        out: their output folder (``None``: not checked).
        resume: continue the runs in ``out`` (default False).
        log: ``--log`` backends (default none).
        marker: see ``check_output`` (default ``plan.json``).
    """
    if out is not None:
        check_output(out, resume=resume, marker=marker)
        if resume:
            check_resume(plan, out)
    check_loggers(tuple(log))
    devices, models, built = {}, {}, set()
    for cfg in plan:
        if cfg.device not in devices:
            devices[cfg.device] = check_device(cfg.device)
        key = _task_key(cfg)
        if key not in models:
            models[key] = check_task(cfg)
        spec = (key, repr(cfg.optimizer_kwargs()), cfg.param_dtype, cfg.grad_release, cfg.device)
        if spec not in built:
            check_optimizer(cfg, models[key], devices[cfg.device])
            built.add(spec)
