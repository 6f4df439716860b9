"""Run a matrix of optimizers x seeds x settings into one folder, resumably.

Layout of an output folder::

    OUT/plan.json                      the planned runs (their configs), written first
    OUT/<optimizer>/<settings>/seed<N>/config.json, metrics.jsonl, checkpoint.pt (while running), result.json
    OUT/summary.json                   every finished run's row, rewritten atomically after each run

``resume=True`` skips finished runs and continues unfinished ones from their last checkpoint; without it a
folder that already holds runs is refused (nothing is overwritten). A run that raises is recorded in
``summary.json["errors"]`` (and ``error.txt`` in its folder) and the matrix goes on.

This is the one runner of the harness: ``effopt bench``, ``effopt suite`` (every protocol) and ``effopt
characterize`` (with a ``StateProbeCallback`` per run) all run their plans through ``run_matrix``, and every run
through ``train.train_run``, so they share one resume logic.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import sys
import traceback
from pathlib import Path

from .config import RunConfig
from .metrics import write_json_atomic
from .train import ConfigMismatch, train_run

SUMMARY_FORMAT = "efficient_optim.bench.summary/1"


def plan_matrix(base: RunConfig, optimizers: list[str], seeds: int | list[int], settings: dict[str, dict] | None = None) -> list[RunConfig]:
    """Every (optimizer, setting, seed) combination as a ``RunConfig`` built from ``base``.

    Args:
        base: the shared settings.
        optimizers: optimizer specs (``name[+key=value...]``).
        seeds: a count (seeds ``0..N-1``) or an explicit list.
        settings: label -> field overrides of ``base`` (e.g. ``{"lr=1e-3": {"lr": 1e-3}}``); ``None``: one
            setting, ``base``'s own label.
    """
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    settings = settings or {base.settings: {}}
    plan = []
    for spec in optimizers:
        for label, overrides in settings.items():
            for seed in seed_list:
                cfg = dataclasses.replace(base, optimizer=spec, seed=seed, settings=label, **overrides)
                cfg.validate()
                plan.append(cfg)
    return plan


def _make_loggers(names: list[str], out: Path, cfg: RunConfig):
    loggers, closers = [], []
    for name in names:
        if name == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RuntimeError("--log tensorboard needs the tensorboard package: pip install tensorboard") from None
            writer = SummaryWriter(str(out / "tensorboard" / cfg.run_id))
            loggers.append(lambda step, rec, w=writer: [w.add_scalar(k, v, step) for k, v in rec.items()
                                                        if isinstance(v, (int, float)) and k != "step"])  # fmt: skip
            closers.append(writer.close)
        elif name == "wandb":
            try:
                import wandb
            except ImportError:
                raise RuntimeError("--log wandb needs the wandb package: pip install wandb") from None
            run = wandb.init(mode="offline", dir=str(out), name=cfg.run_id, config=cfg.to_dict(), reinit=True)
            loggers.append(lambda step, rec, r=run: r.log({k: v for k, v in rec.items() if k != "step"}, step=step))
            closers.append(run.finish)
        else:
            raise ValueError(f"unknown logger {name!r}; choose tensorboard or wandb")
    return loggers, closers


def collect_summary(out: Path, plan: list[RunConfig] | None = None, command: str | None = None) -> dict:
    """``summary.json``'s content from the run folders under ``out`` (in plan order when there is a plan)."""
    if plan is None:
        plan = load_plan(out)
    runs, errors, pending = [], [], []
    for cfg in plan:
        run_dir = out / cfg.run_id
        if (run_dir / "result.json").is_file():
            runs.append(json.loads((run_dir / "result.json").read_text()))
        elif (run_dir / "error.txt").is_file():
            errors.append({"run": cfg.run_id, "optimizer": cfg.optimizer, "seed": cfg.seed,
                           "error": (run_dir / "error.txt").read_text().strip().splitlines()[-1]})  # fmt: skip
        else:
            pending.append(cfg.run_id)
    return {"format": SUMMARY_FORMAT, "updated": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": command, "runs": runs, "errors": errors, "pending": pending}  # fmt: skip


def load_plan(out: Path) -> list[RunConfig]:
    path = out / "plan.json"
    if not path.is_file():
        raise FileNotFoundError(f"{out} is not a run folder (no plan.json)")
    return [RunConfig.from_dict(c) for c in json.loads(path.read_text())["runs"]]


def run_matrix(plan: list[RunConfig], out: Path, *, resume: bool = False, log: tuple[str, ...] = (),
               progress: bool = True, command: str | None = None, on_result=None, callbacks=None) -> dict:  # fmt: skip
    """Run ``plan`` into ``out`` and return the summary (also written to ``out/summary.json``).

    Args:
        plan: the runs (``plan_matrix``).
        out: the output folder.
        resume: continue a folder that already holds runs (finished runs are skipped; default False).
        log: extra loggers: ``tensorboard`` and/or ``wandb`` (offline mode; default none).
        progress: show a progress bar (tqdm) on stderr (default True).
        command: the command line, recorded in the summary (default none).
        on_result: called with each run's row as it finishes, e.g. to print a line (default none).
        callbacks: ``callbacks(cfg) -> list[Callback]``, fresh ones for each run that trains (probes,
            controllers; ``bench.callbacks``); default none.
    """
    out.mkdir(parents=True, exist_ok=True)
    plan_path = out / "plan.json"
    if plan_path.is_file():
        if not resume:
            raise FileExistsError(f"{out} already holds runs: pass --resume to continue them, or choose another --out")
        old = load_plan(out)
        known = {c.run_id for c in old}
        plan = old + [c for c in plan if c.run_id not in known]
    write_json_atomic(plan_path, {"runs": [c.to_dict() for c in plan]})
    todo = [c for c in plan if not (out / c.run_id / "result.json").is_file()]
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(c.steps for c in todo), unit="step", file=sys.stderr, dynamic_ncols=True, leave=False)
    try:
        for cfg in todo:
            run_dir = out / cfg.run_id
            (run_dir / "error.txt").unlink(missing_ok=True)
            loggers, closers = _make_loggers(list(log), out, cfg)
            try:
                extra = list(callbacks(cfg)) if callbacks is not None else []
                row = train_run(cfg, run_dir, callbacks=extra, loggers=loggers, progress=bar)
            except (KeyboardInterrupt, ConfigMismatch):
                raise
            except Exception:  # one broken run must not lose the matrix
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / "error.txt").write_text(traceback.format_exc())
                print(f"\nrun {cfg.run_id} failed: {traceback.format_exc().strip().splitlines()[-1]}", file=sys.stderr)
                row = None
            finally:
                for close in closers:
                    close()
            write_json_atomic(out / "summary.json", collect_summary(out, plan, command))
            if row is not None and on_result is not None:
                on_result(row)
    finally:
        if bar is not None:
            bar.close()
    summary = collect_summary(out, plan, command)
    write_json_atomic(out / "summary.json", summary)
    return summary
