"""The ``effopt`` command line: ``effopt list`` and ``effopt bench``."""

from __future__ import annotations

import sys


def _list(argv) -> int:
    from .registry import list_optimizers, optimizer_entry

    for name in list_optimizers():
        e = optimizer_entry(name)
        status = "" if e.available() else f"  (needs: pip install {e.requires})"
        print(f"{name:22s} {e.description}{status}")
    return 0


COMMANDS = {
    "list": ("registered optimizers and whether each is installed", _list),
    "bench": ("quick optimizer comparison on a small LM (see effopt bench --help)", None),
}


def main(argv=None) -> int:
    """Entry point of the ``effopt`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: effopt {list,bench} [options]\n")
        for name, (text, _) in COMMANDS.items():
            print(f"  {name:8s} {text}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    if argv[0] == "bench":
        from .bench.quick import main as bench_main

        return bench_main(argv[1:])
    return _list(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
