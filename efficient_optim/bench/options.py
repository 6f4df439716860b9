"""Command-line options shared by ``effopt bench`` and ``effopt suite``, and checks that fail early."""

from __future__ import annotations

import argparse
import datetime
import textwrap
from pathlib import Path

from ..registry import optimizer_entry
from .config import RunConfig, parse_spec
from .data import SHIPPED_CORPORA, WIKITEXT


class UsageError(ValueError):
    """Bad command-line input: printed as ``error: ...`` with exit code 2."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps a multi-line description's own line breaks (a one-line one is wrapped), and wraps option help
    at spaces only: a long word (an optimizer list, a path, ``wikitext-103``) overflows the line rather
    than being cut in two."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text.strip():
            return super()._fill_text(text, width, indent)
        return argparse.HelpFormatter._fill_text(self, text, width, indent)

    def _split_lines(self, text: str, width: int) -> list[str]:
        text = self._whitespace_matcher.sub(" ", text).strip()
        return textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)


def add_run_options(ap: argparse.ArgumentParser, defaults: RunConfig) -> None:
    """Model, data, schedule and output options (defaults from ``defaults``)."""
    d = defaults
    ap.add_argument("--data", default=d.data,
                    help="embedded (default: the Python standard library's sources, no download), tinyshakespeare "
                    "(shipped), wikitext-2, wikitext-103 (need datasets + network), or a text file / folder")  # fmt: skip
    ap.add_argument("--model", default=d.model, help=f"model preset: gpt2-tiny, gpt2-mini, gpt2-small, llama-60m, digits-cnn (default {d.model})")
    ap.add_argument("--layers", type=int, default=d.layers, help="override the preset's number of layers")
    ap.add_argument("--width", type=int, default=d.width, help="override the preset's hidden size")
    ap.add_argument("--heads", type=int, default=d.heads, help="override the preset's attention heads")
    ap.add_argument("--context", "--ctx", type=int, default=d.context, help=f"sequence length (default {d.context or 'the preset'})")
    ap.add_argument("--tokenizer", choices=("bytes", "bpe"), default=d.tokenizer, help="bytes (default) or a byte-level BPE trained on the corpus")
    ap.add_argument("--vocab-size", type=int, default=d.vocab_size, help=f"BPE vocabulary size (default {d.vocab_size})")
    ap.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps per run (default {d.steps})")
    ap.add_argument("--batch", "--batch-size", type=int, default=d.batch_size, help=f"sequences per micro-batch (default {d.batch_size})")
    ap.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per step (default 1)")
    ap.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate, AdamW scale (default {d.lr}); Lion/SGD are scaled, see docs/bench.md")
    ap.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help=f"cosine floor as a fraction of --lr (default {d.min_lr_ratio})")
    ap.add_argument("--warmup", type=int, default=d.warmup_steps, help="warm-up steps (default "
                    + (f"{d.warmup_steps})" if d.warmup_steps is not None else "5%% of --steps)"))
    ap.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"decoupled weight decay (default {d.weight_decay})")
    ap.add_argument("--clip", type=float, default=d.clip, help=f"gradient-norm clipping, 0 = off (default {d.clip})")
    ap.add_argument("--eval-every", type=int, default=d.eval_every, help="evaluate every N steps; 0 = at the end only (default: five times per run, every steps//5)")
    ap.add_argument("--eval-batches", type=int, default=d.eval_batches, help=f"validation batches per evaluation (default {d.eval_batches})")
    ap.add_argument("--test-fraction", type=float, default=d.test_fraction,
                    help=f"the last part of the data held out as the test split, evaluated once at the end of each run "
                    f"(default {d.test_fraction}; 0 = none: validation is the whole held-out last 10%%, as before the "
                    "test split existed)")  # fmt: skip
    ap.add_argument("--target-ppl", type=float, default=d.target_ppl, help="record the first evaluated step at or below this validation perplexity")
    ap.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help=f"resumable checkpoint every N steps (default {d.checkpoint_every})")
    ap.add_argument("--device", default=d.device, help="cpu, cuda or auto (default auto)")
    ap.add_argument("--param-dtype", choices=("float32", "bfloat16", "float16"), default=d.param_dtype,
                    help="store the model's weights in this dtype (default float32); pair bf16 with an optimizer's "
                    "+correction_bits=8|16 or +weight_rounding=stochastic|kahan")  # fmt: skip
    ap.add_argument("--grad-release", action="store_true", default=d.grad_release,
                    help="step each parameter during backward and free its gradient (needs --clip 0)")  # fmt: skip
    ap.add_argument("--grad-compression", default=d.grad_compression,
                    help="compress the gradients, accumulated in compressed buffers: a compressor spec with error "
                    "feedback (q8, q4, q2, bf16, top10%%/q8, rand10%%+residual=none) or dgc+fraction=0.01 "
                    "(default none; docs/mango.md)")  # fmt: skip
    ap.add_argument("--controller", default=d.controller,
                    help="a controller choosing each layer's gradient and momentum compression: kind[+key=value...], "
                    "e.g. rules+every=25 or planner+budget_bpp=8 (default none; docs/mango.md)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=None, help="output folder (default runs/<command>/<date-time>)")
    ap.add_argument("--resume", action="store_true", help="continue the runs in --out: finished runs are skipped, unfinished ones resume")
    ap.add_argument("--log", default="", help="extra logging: tensorboard, wandb (offline) or both, comma-separated")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")


def base_config(args: argparse.Namespace) -> RunConfig:
    """A ``RunConfig`` from the parsed options; ``UsageError`` for bad data paths or values."""
    data = str(args.data)
    if data not in ("embedded", *SHIPPED_CORPORA, *WIKITEXT) and not Path(data).exists():
        raise UsageError(f"data path not found: {data} (use embedded, tinyshakespeare, wikitext-2, wikitext-103 or an existing file/folder)")
    cfg = RunConfig(data=data, model=args.model, layers=args.layers, width=args.width, heads=args.heads,
                    context=args.context, tokenizer=args.tokenizer, vocab_size=args.vocab_size, steps=args.steps,
                    batch_size=args.batch, grad_accum=args.grad_accum, lr=args.lr, min_lr_ratio=args.min_lr_ratio,
                    warmup_steps=args.warmup, weight_decay=args.weight_decay, clip=args.clip,
                    eval_every=args.eval_every, eval_batches=args.eval_batches, test_fraction=args.test_fraction, target_ppl=args.target_ppl,
                    checkpoint_every=args.checkpoint_every, device=args.device, param_dtype=args.param_dtype,
                    grad_release=args.grad_release, grad_compression=getattr(args, "grad_compression", None),
                    controller=getattr(args, "controller", None))  # fmt: skip
    try:
        cfg.validate()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return cfg


def check_optimizers(specs: list[str]) -> None:
    """``UsageError`` for an unknown name, a malformed spec or a missing optional package."""
    for spec in specs:
        try:
            name, _ = parse_spec(spec)
            entry = optimizer_entry(name)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if not entry.available():
            raise UsageError(f"optimizer {name!r} needs the package {entry.requires!r} (pip install {entry.requires})")


def output_folder(args: argparse.Namespace, command: str) -> Path:
    """``--out``, or a new ``runs/<command>/<date-time>`` folder (``--resume`` needs an explicit ``--out``)."""
    if args.out is not None:
        return args.out
    if args.resume:
        raise UsageError("--resume needs --out: the folder of the runs to continue")
    return Path("runs") / command / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def log_names(args: argparse.Namespace) -> tuple[str, ...]:
    names = tuple(n.strip() for n in args.log.split(",") if n.strip())
    for n in names:
        if n not in ("tensorboard", "wandb"):
            raise UsageError(f"unknown --log {n!r}; choose tensorboard, wandb or both")
    return names
