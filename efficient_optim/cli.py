"""The ``effopt`` command line: ``list``, ``bench``, ``suite``, ``report``, ``characterize``, ``decompose``,
``finetune``, ``landscape``, ``theory`` and ``mango``."""

from __future__ import annotations

import sys


def _list(argv) -> int:
    from .registry import list_optimizers, optimizer_entry

    for name in list_optimizers():
        e = optimizer_entry(name)
        status = "" if e.available() else f"  (needs: pip install {e.requires})"
        print(f"{name:22s} {e.description}{status}")
    return 0


def _bench(argv) -> int:
    from .bench.quick import main

    return main(argv)


def _suite(argv) -> int:
    from .bench.suites import main

    return main(argv)


def _report(argv) -> int:
    import argparse
    from pathlib import Path

    from .bench.report import build_report, terminal_table
    from .bench.runner import collect_summary, load_plan

    ap = argparse.ArgumentParser(prog="effopt report", description="Rebuild report.md, summary.json and the plots of a run folder.")
    ap.add_argument("folder", type=Path, help="an output folder of effopt bench or effopt suite")
    args = ap.parse_args(argv)
    try:
        plan = load_plan(args.folder)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from .bench.metrics import write_json_atomic

    old = args.folder / "summary.json"
    command = None
    if old.is_file():
        import json

        command = json.loads(old.read_text()).get("command")
    summary = collect_summary(args.folder, plan, command)
    write_json_atomic(old, summary)
    if (args.folder / "suite.json").is_file():
        from .bench.suites import rebuild_suite_report

        path = rebuild_suite_report(args.folder)
    else:
        path = build_report(args.folder, "effopt bench")
    print(terminal_table(summary["runs"]))
    print(f"\nwrote {path}")
    return 0


def _characterize(argv) -> int:
    from .bench.characterize import main

    return main(argv)


def _finetune(argv) -> int:
    from .bench.finetune import main

    return main(argv)


def _landscape(argv) -> int:
    from .bench.landscape_cmd import main

    return main(argv)


def _theory(argv) -> int:
    from .bench.theory_cmd import main

    return main(argv)


def _decompose(argv) -> int:
    from .bench.decompose import main

    return main(argv)


def _mango(argv) -> int:
    from .compress.train_policy import main

    if not argv or argv[0] in ("-h", "--help") or argv[0] != "train-policy":
        print("usage: effopt mango train-policy --out PATH [options]   (see effopt mango train-policy --help)")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown mango command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    return main(argv[1:])


COMMANDS = {
    "list": ("registered optimizers and whether each is installed", _list),
    "bench": ("compare optimizers on a small LM (see effopt bench --help)", _bench),
    "suite": ("run a research protocol with verdicts: effopt suite {baselines,lr-sweep,...} (see effopt suite --list)", _suite),
    "report": ("rebuild report.md and plots from a run folder: effopt report DIR", _report),
    "characterize": ("why low-bit states fail and what fixes them (P2/P5/P6): effopt characterize [--quick]", _characterize),
    "decompose": ("where a hybrid optimizer's error comes from (P3): effopt decompose [...]", _decompose),
    "finetune": ("downstream fine-tuning of a pretrained small LM per optimizer: effopt finetune [--quick]", _finetune),
    "landscape": ("2-D loss surfaces and mode connectivity of optimizers' solutions: effopt landscape [--quick]", _landscape),
    "theory": ("convergence, EMA error and bits-vs-epsilon checks on known optima: effopt theory [--quick]", _theory),
    "mango": ("train the learned gradient/momentum compression policy: effopt mango train-policy --out PATH", _mango),
}


def main(argv=None) -> int:
    """Entry point of the ``effopt`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: effopt {" + ",".join(COMMANDS) + "} [options]\n")
        for name, (text, _) in COMMANDS.items():
            print(f"  {name:13s} {text}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    return COMMANDS[argv[0]][1](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
