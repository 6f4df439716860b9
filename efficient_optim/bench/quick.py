"""``effopt bench``: compare optimizers on the same data, model, seeds and schedule; print a table.

    effopt bench                                   # the quick comparison (time: BENCHMARKS.md, 'The main job')
    effopt bench --data tinyshakespeare --seeds 3 --steps 400 --optimizers adamw,qadamw8,qadamw4
    effopt bench --optimizers adamw,qadamw4+m_map=softsign+rounding=stochastic,lowrank_adam+rank=16
    effopt bench --out runs/mine --resume          # continue an interrupted matrix

By default a GPT-2 built from a ``transformers`` config (gpt2-tiny: 2 layers, width 128, 4 heads; context
64; byte-level vocabulary: ~0.45M parameters) trains on the running interpreter's own standard-library
sources (no download, on any machine) with lr 3e-3, a 75-step linear warm-up (both chosen by an AdamW lr x
warm-up sweep, BENCHMARKS.md) + cosine decay and clipping at 1.0. Each run
writes its metrics into the output folder; ``summary.json``, ``report.md`` and plots are written there
too (format: docs/bench.md).
"""

from __future__ import annotations

import argparse
import shlex
import sys

from tqdm import tqdm

from ..kernels.cpu import load_cpu_kernels
from ..registry import optimizer_entry
from ..third_party import ChatterLog, chatter_to, quiet
from .config import MAIN_JOB_LR, MAIN_JOB_WARMUP, RunConfig
from .options import (
    HelpFormatter,
    UsageError,
    add_run_options,
    base_config,
    check_optimizers,
    log_names,
    output_folder,
)
from .plan_log import plan_callbacks
from .preflight import preflight
from .report import build_report, terminal_table
from .runner import plan_matrix, run_matrix

DEFAULT_OPTIMIZERS = ("adamw", "qadamw8", "qadamw4", "hybrid_adam", "adafactor", "lion", "adamw_bnb_8bit")
QUICK = RunConfig(steps=250, context=64, batch_size=16, lr=MAIN_JOB_LR, warmup_steps=MAIN_JOB_WARMUP)


def default_optimizers() -> tuple[list[str], list[str]]:
    """The default comparison's names that can run here, and those skipped (with the reason)."""
    names, skipped = [], []
    for n in DEFAULT_OPTIMIZERS:
        try:
            entry = optimizer_entry(n)
        except ValueError:
            skipped.append(f"{n} (not in this version)")
            continue
        (names if entry.available() else skipped).append(n if entry.available() else f"{n} (pip install {entry.requires})")
    return names, skipped


def load_kernel_first(plan: list[RunConfig]) -> None:
    """Build (or load) the fused CPU kernel now when a run will use it, so that its one-minute first build
    is announced before the progress bar starts instead of stalling it."""
    from .train import resolve_device

    if any(optimizer_entry(c.optimizer_kwargs()[0]).ours and resolve_device(c.device).type == "cpu" for c in plan):
        load_cpu_kernels()


def main(argv=None) -> int:
    """``effopt bench``: exit code 0, 1 (a run failed) or 2 (bad input). What optional baselines print while
    they are imported and built goes to ``<out>/third_party.log``, not between the progress bar's lines."""
    with chatter_to(ChatterLog()) as chatter:
        return _main(argv, chatter)


def _main(argv, chatter: ChatterLog) -> int:
    ap = argparse.ArgumentParser(prog="effopt bench", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--optimizers", default=None,
                    help="comma-separated specs: name[+key=value...] (default: the installed ones of "
                    f"{', '.join(DEFAULT_OPTIMIZERS)})")  # fmt: skip
    ap.add_argument("--seeds", type=int, default=1, help="seeds per optimizer (default 1)")
    add_run_options(ap, QUICK)
    args = ap.parse_args(argv)
    try:
        if args.optimizers is None:
            specs, skipped = default_optimizers()
            if skipped:
                print(f"skipped: {', '.join(skipped)}")
        else:
            specs = [s for s in args.optimizers.split(",") if s.strip()]
            if not specs:
                raise UsageError("--optimizers names no optimizer")
        check_optimizers(specs)
        if args.seeds < 1:
            raise UsageError(f"--seeds must be >= 1, got {args.seeds}")
        base = base_config(args)
        out = output_folder(args, "bench")
        loggers = log_names(args)
        plan = plan_matrix(base, specs, args.seeds)
        with quiet("checking the plan: model, data and optimizers"):  # imports transformers, bitsandbytes, ...
            preflight(plan, out, resume=args.resume, log=loggers)  # everything checked before the header
    except ValueError as exc:  # UsageError, or a setting plan_matrix refuses
        print(f"error: {exc}", file=sys.stderr)
        return 2
    command = "effopt bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"{len(plan)} runs ({len(specs)} optimizers x {args.seeds} seeds), model {base.model}, data {base.data}, "
          f"{base.steps} steps -> {out}" + ("" if args.resume else f"  (resume: --out {out} --resume)"), flush=True)  # fmt: skip
    chatter.keep_in(out / "third_party.log")
    load_kernel_first(plan)

    def show(row: dict) -> None:  # tqdm.write: the line goes above the progress bar, not after its text
        if row["diverged"]:
            tqdm.write(f"  {row['optimizer']:28s} seed {row['seed']}: DIVERGED at step {row['diverged_at_step']}", file=sys.stdout)
            return
        test = f" test {row['test_loss']:.4f}" if row.get("test_loss") is not None else ""
        tqdm.write(f"  {row['optimizer']:28s} seed {row['seed']}: train {row['final_train_loss']:.4f} val {row['final_val_loss']:.4f}{test}  "
                   f"{row['state_bytes']:,} state bytes  {row['step_time_ms'] or 0:.1f} ms/step", file=sys.stdout)  # fmt: skip

    try:
        summary = run_matrix(plan, out, resume=args.resume, log=loggers, progress=not args.no_progress,
                             command=command, on_result=show, callbacks=plan_callbacks)  # fmt: skip
    except (FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: continue with  effopt bench ... --out {out} --resume", file=sys.stderr)
        return 130
    if not summary["runs"]:  # no report of nothing: the errors are in each run's error.txt
        print(f"error: no run finished ({len(summary['errors'])} failed; see error.txt under {out})", file=sys.stderr)
        return 1
    print()
    print(terminal_table(summary["runs"]))
    report = build_report(out, "effopt bench")
    print(f"\nwrote {out / 'summary.json'} and {report}")
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
