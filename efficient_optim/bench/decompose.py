"""``effopt decompose``: the error decomposition (``analysis.decomposition``) on the harness's tiny LM, from the
command line. The harness builds the task (data, model, batches, schedule: ``RunConfig.build_task``) and hands
it to the analysis, which knows nothing of the harness."""

from __future__ import annotations

import time
from pathlib import Path

from ..analysis import decomposition
from ..analysis.decomposition import DEFAULT_EVERY, DEFAULT_STEPS, TRAJECTORIES
from ..analysis.decomposition_measures import SOURCES, format_number
from ..analysis.decomposition_report import write_outputs
from ..analysis.decomposition_variants import DEFAULT_SPEC, parse_hybrid_config
from ..third_party import ChatterLog, chatter_to, quiet


def build_parser():
    """The ``effopt decompose`` argument parser (defaults from ``bench.config.RunConfig``)."""
    import argparse

    from .config import RunConfig
    from .options import HelpFormatter

    d = RunConfig()
    ap = argparse.ArgumentParser(prog="effopt decompose", formatter_class=HelpFormatter, description=(
        "Protocol P3: run a HybridAdam configuration beside dense fp32 AdamW on the same gradients and split the "
        "error of its update direction into quantization alone, factoring/low rank alone, and both; says whether "
        "they add or multiply. Writes decomposition.json, decomposition.png and decomposition.md."))  # fmt: skip
    ap.add_argument("--spec", default=DEFAULT_SPEC,
                    help="the hybrid configuration, hybrid_adam[+key=value...] (default hybrid_adam: 4-bit m, factored v), "
                    "e.g. hybrid_adam+m_codec=8bit+v_codec=lowrank+rank=8")  # fmt: skip
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"training steps (default {DEFAULT_STEPS})")
    ap.add_argument("--every", type=int, default=DEFAULT_EVERY,
                    help=f"measure every N steps (default {DEFAULT_EVERY}; the last step always)")  # fmt: skip
    ap.add_argument("--trajectory", choices=TRAJECTORIES, default="adamw",
                    help="whose update moves the model: adamw (default; exact AdamW run) or hybrid (the configuration's own run)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=None, help="output folder (default runs/decompose/<date-time>)")
    ap.add_argument("--data", default=d.data,
                    help="embedded (default, no download), wikitext-2, wikitext-103 or a text file/folder")  # fmt: skip
    ap.add_argument("--model", default=d.model, help=f"model preset (default {d.model})")
    ap.add_argument("--layers", type=int, default=None, help="override the preset's number of layers")
    ap.add_argument("--width", type=int, default=None, help="override the preset's hidden size")
    ap.add_argument("--heads", type=int, default=None, help="override the preset's attention heads")
    ap.add_argument("--context", "--ctx", type=int, default=None, help="sequence length (default: the harness's)")
    ap.add_argument("--batch", type=int, default=d.batch_size, help=f"sequences per batch (default {d.batch_size})")
    ap.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate of the trajectory (default {d.lr})")
    ap.add_argument("--weight-decay", type=float, default=d.weight_decay,
                    help=f"trajectory's weight decay (default {d.weight_decay})")  # fmt: skip
    ap.add_argument("--clip", type=float, default=d.clip, help=f"gradient-norm clipping, 0 = off (default {d.clip})")
    ap.add_argument("--seed", type=int, default=0, help="model init, batch order and stochastic rounding (default 0)")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    return ap


def _checked_config(args):
    """The run config of the parsed ``args``, checked (device, model, data, spec, --out) before any step;
    ``ValueError`` naming what is wrong."""
    from .config import RunConfig
    from .data import SHIPPED_CORPORA, WIKITEXT
    from .preflight import preflight

    data = str(args.data)
    if data not in ("embedded", *SHIPPED_CORPORA, *WIKITEXT) and not Path(data).exists():
        raise ValueError(f"data path not found: {data} (use embedded, wikitext-2, wikitext-103 or an existing file/folder)")
    cfg = RunConfig(data=data, model=args.model, layers=args.layers, width=args.width, heads=args.heads,
                    context=args.context, batch_size=args.batch, steps=max(args.steps, 1), lr=args.lr,
                    weight_decay=args.weight_decay, clip=args.clip, seed=args.seed, device=args.device)  # fmt: skip
    cfg.validate()
    parse_hybrid_config(args.spec)
    if args.steps < 1 or args.every < 1:
        raise ValueError(f"--steps and --every must be >= 1 (got {args.steps}, {args.every})")
    args.out = args.out or Path("runs") / "decompose" / time.strftime("%Y%m%d-%H%M%S")
    with quiet("checking the plan: model, data and optimizer"):  # imports transformers (and what it imports)
        preflight([cfg], args.out, marker=None)  # device, model, data and --out, before any step
    return cfg


def main(argv=None) -> int:
    """``effopt decompose``: run ``decompose_errors`` on the harness's tiny LM and write the outputs. What
    transformers prints while imported goes to ``<out>/third_party.log``."""
    with chatter_to(ChatterLog()) as chatter:
        return _main(argv, chatter)


def _main(argv, chatter: ChatterLog) -> int:
    import shlex
    import sys

    args = build_parser().parse_args(argv)
    argv_list = sys.argv[1:] if argv is None else list(argv)
    try:
        cfg = _checked_config(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    chatter.keep_in(args.out / "third_party.log")
    started = time.perf_counter()
    tick = max(1, args.steps // 10)

    def progress(step: int, total: int) -> None:
        if not args.quiet and (step % tick == 0 or step == total):
            print(f"  step {step}/{total}  ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)

    try:
        result = decomposition.decompose_errors(cfg, args.spec, args.steps, args.every, trajectory=args.trajectory,
                                  progress=progress)  # fmt: skip
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    paths = write_outputs(result, args.out, command="effopt decompose " + shlex.join(argv_list))
    s = result["summary"]
    print(f"mean relative error of the update direction over {s['measured_steps']} measured steps "
          f"({s['aggregated_over']}: {s['compressed_layers']} of {s['layers']} parameters compressed):")  # fmt: skip
    for x in SOURCES:
        print(f"  {x:7s} {format_number(s[f'mean_err_{x}'])}   cos {format_number(s[f'mean_cos_{x}'])}")
    print(f"verdict: {s['verdict']}\n{s['verdict_text']}")
    for path in paths.values():
        print(f"wrote {path}")
    return 0
