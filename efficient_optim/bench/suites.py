"""``effopt suite NAME``: run a research protocol (docs/protocols.md) end to end; the report gives every
criterion with its measured value and a verdict (met / not met / not measurable here, and why).
A ``--quick`` run (fewer steps, one seed) gives *indicative* verdicts only: it says which way a criterion
points, never that it is met or failed.

    effopt suite --list
    effopt suite baselines          # alias p1: SGD, Adam, AdamW, bnb 8-bit, Adafactor, Lion + ours, 3 seeds
    effopt suite lowrank-adam --quick   # alias p7: low-rank Adam minimum viable test, a short version
    effopt report runs/suite/baselines/...  # rebuild the report and verdicts from the files

Protocols are plug-ins, one file each in ``bench/protocols/`` (the interface: ``bench.protocols.base``); a
protocol's id (p1, p7, p8) is an alias of its name. Missing optimizers (not installed, or not built yet) are
reported as criteria that could not be measured, never dropped. Runs go through the harness's one runner
(``runner.run_matrix``), with the protocol's callbacks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path

from ..third_party import ChatterLog, chatter_to, quiet
from .config import RunConfig
from .metrics import write_json_atomic
from .options import HelpFormatter, add_run_options, base_config, log_names, output_folder
from .preflight import preflight
from .protocols import get_protocol, protocols, register_protocol
from .protocols.base import (  # noqa: F401  (re-exported: the names suites were written with before bench.protocols)
    INDICATIVE,
    MET,
    NOT_MEASURABLE,
    NOT_MET,
    Protocol,
    Verdict,
    available,
    indicative,
    verdict_markdown,
)
from .report import build_report, terminal_table
from .runner import collect_summary, load_plan, run_matrix

# Earlier names of the protocol interface, kept so that code written against them keeps working.
Suite = Protocol
register_suite = register_protocol


def _write_suite(out: Path, suite: Protocol, base: RunConfig, missing: list[Verdict], quick: bool = False,
                 seeds: int | None = None) -> Path:  # fmt: skip
    """Compute the verdicts (indicative ones for a ``quick`` run of ``seeds`` seeds), write suite.json and report.md."""
    runs = collect_summary(out, load_plan(out))["runs"]
    verdicts = missing + suite.verdicts(runs, out, base)
    if quick:
        verdicts = indicative(verdicts, base, seeds or 1)
    write_json_atomic(out / "suite.json", {"suite": suite.name, "title": suite.title, "base": base.to_dict(),
                                           "quick": quick, "seeds": seeds,
                                           "missing": [dataclasses.asdict(v) for v in missing],
                                           "verdicts": [dataclasses.asdict(v) for v in verdicts]})  # fmt: skip
    return build_report(out, suite.title, [verdict_markdown(suite.title, verdicts), *suite.sections(runs, out, base)],
                        target_ppl=suite.table_target(runs))  # fmt: skip


def rebuild_suite_report(out: Path) -> Path:
    """Recompute a suite's verdicts and report from its folder (``effopt report``); folders written under a
    protocol id (``p1``) are found by it."""
    meta = json.loads((out / "suite.json").read_text())
    suite = get_protocol(meta["suite"])
    if suite is None:
        raise ValueError(f"{out / 'suite.json'} names the protocol {meta['suite']!r}, which this version does not have")
    missing = [Verdict(**v) for v in meta.get("missing", [])]
    return _write_suite(out, suite, RunConfig.from_dict(meta["base"]), missing, meta.get("quick", False), meta.get("seeds"))


def _names_text() -> str:
    return ", ".join(p.name + (f" ({', '.join(p.aliases)})" if p.aliases else "") for p in protocols())


def _parser(argv: list[str]) -> tuple[argparse.ArgumentParser, Protocol | None]:
    """The parser, with the run options' defaults and the own options of the protocol named in ``argv``."""
    ap = argparse.ArgumentParser(prog="effopt suite", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("name", nargs="?", help="the protocol, by name or id: " + _names_text())
    ap.add_argument("--list", action="store_true", help="list the protocols")
    ap.add_argument("--quick", action="store_true", help="a short version (fewer steps, one seed, smaller sweeps)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds for the main comparison (default 3; --quick: 1)")
    # the protocol decides the run options' defaults: find it first (without -h, so that help lists them all)
    pre, _ = ap.parse_known_args([a for a in argv if a not in ("-h", "--help")])
    suite = get_protocol(pre.name) if pre.name else None
    add_run_options(ap, suite.defaults if suite else Protocol.defaults)
    if suite is not None:
        suite.add_options(ap)
    return ap, suite


def _plan(suite: Protocol, args: argparse.Namespace, argv: list[str]):
    """``(base, seeds, out, loggers, plan, missing)``; ``ValueError`` (a ``UsageError``) for bad input."""
    if args.quick and "--steps" not in argv:
        args.steps = suite.quick_steps
    if args.quick and "--eval-every" not in argv:
        args.eval_every = None  # five evaluations per run, whatever the suite's full-length interval
    base = base_config(args)
    seeds = args.seeds or (1 if args.quick else suite.seeds)
    out = output_folder(args, f"suite/{suite.name}")
    loggers = log_names(args)
    suite.configure(args)
    # a protocol's plan may build a model (mango measures its budget on one): transformers, bitsandbytes, ...
    with quiet("checking the plan: model, data and optimizers"):
        plan, missing = suite.plan(base, seeds, args.quick)
        preflight(plan, out, resume=args.resume, log=loggers)  # everything checked before the header
    return base, seeds, out, loggers, plan, missing


def main(argv=None) -> int:
    """``effopt suite``: exit code 0, 1 (a run failed), 2 (bad input) or 130 (interrupted). What optional
    baselines and transformers print while they are imported goes to ``<out>/third_party.log``."""
    with chatter_to(ChatterLog()) as chatter:
        return _main(argv, chatter)


def _main(argv, chatter: ChatterLog) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap, suite = _parser(argv)
    args = ap.parse_args(argv)
    if args.list or not args.name:
        for s in protocols():
            alias = f" ({', '.join(s.aliases)})" if s.aliases else ""
            print(f"{s.name + alias:24s} {s.title}")
        return 0 if args.list else 2
    if suite is None:
        print(f"error: unknown suite {args.name!r}; known: {_names_text()}", file=sys.stderr)
        return 2
    try:
        base, seeds, out, loggers, plan, missing = _plan(suite, args, argv)
    except ValueError as exc:  # UsageError, or a setting plan_matrix refuses
        print(f"error: {exc}", file=sys.stderr)
        return 2
    command = "effopt suite " + shlex.join(argv)
    print(f"{suite.title}: {len(plan)} runs, {base.steps} steps each -> {out}", flush=True)
    chatter.keep_in(out / "third_party.log")
    for m in missing:
        print(f"  not measurable here: {m.subject}: {m.reason}")
    try:
        summary = run_matrix(plan, out, resume=args.resume, log=loggers, progress=not args.no_progress, command=command,
                             callbacks=suite.callbacks)  # fmt: skip
    except (FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: continue with  effopt suite {suite.name} ... --out {out} --resume", file=sys.stderr)
        return 130
    report = _write_suite(out, suite, base, missing, args.quick, seeds)
    print(terminal_table(summary["runs"]))
    print()
    for v in json.loads((out / "suite.json").read_text())["verdicts"]:
        print(f"  [{v['verdict']}] {v['criterion']} — {v['subject']}: {v['measured']} {v['reason']}")
    print(f"\nwrote {report}")
    return 1 if summary["errors"] else 0
