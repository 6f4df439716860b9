"""Gradient compression on a small language model: error per compressor, and compressed accumulation's
training bytes and losses against plain accumulation, measured in one run.

    python benchmarks/grad_compression.py                       # gpt2-tiny, 100 steps x 4 micro-batches
    python benchmarks/grad_compression.py --steps 20 --json out/grad_compression.json
    python benchmarks/grad_compression.py --part bytes        # only part 3 (a few seconds)

Part 1: the gradients of one batch of the harness's language model (the benchmark's own data and model
presets) go through each compressor once: bits per element (scales, indices included), relative L2 error
and cosine to the exact gradient.

Part 2: the same model trained with AdamW (fp32 moments, so only the gradient changes), ``--accum``
micro-batches per step, global clipping at 1.0, the same batches for every configuration: plain
accumulation in ``p.grad`` against ``GradAccumulator`` with each compressor (one parameter decoded and
stepped at a time). ``training_bytes`` counts the gradient memory at the step's peak; validation loss on
the harness's fixed validation batches.

Part 3: training bytes of a GPT-2-small-like stack of parameters (85M, ``benchmarks/common.py``) after one
real accumulation step (a synthetic loss, ``--accum`` backward passes, the optimizer step), per gradient
path, with QAdamW 8-bit states: what ``training_bytes`` counts at the step's peak.

Nothing here is an assertion: the numbers are printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import gpt2_like_shapes, make_params  # noqa: E402

import efficient_optim as eo  # noqa: E402
from efficient_optim.bench.config import RunConfig  # noqa: E402
from efficient_optim.bench.tasks import build_task  # noqa: E402
from efficient_optim.compress import ErrorFeedback, GradAccumulator, NoFeedback, Quantize, RandomK, TopK  # noqa: E402

ERROR_CONFIGS = {
    "bf16": lambda: Quantize(16),
    "8-bit linear": lambda: Quantize(8),
    "8-bit dynamic": lambda: Quantize(8, map="dynamic"),
    "4-bit softsign": lambda: Quantize(4),
    "4-bit linear": lambda: Quantize(4, map="linear"),
    "4-bit dynamic": lambda: Quantize(4, map="dynamic"),
    "2-bit linear_nozero": lambda: Quantize(2),
    "2-bit linear (ternary)": lambda: Quantize(2, map="linear"),
    "top-10 %": lambda: TopK(0.1),
    "top-10 %, 8-bit values": lambda: TopK(0.1, values=Quantize(8)),
    "top-1 %": lambda: TopK(0.01),
    "random 10 % (rescaled)": lambda: RandomK(0.1),
}
TRAIN_CONFIGS = {
    "plain accumulation (fp32 p.grad)": None,
    "8-bit + 8-bit residual": lambda: ErrorFeedback(Quantize(8)),
    "4-bit + 8-bit residual": lambda: ErrorFeedback(Quantize(4)),
    "4-bit, no feedback": lambda: NoFeedback(Quantize(4)),
    "2-bit + 8-bit residual": lambda: ErrorFeedback(Quantize(2)),
    "top-10 % + 8-bit residual": lambda: ErrorFeedback(TopK(0.1)),
}


def make_task(args):
    cfg = RunConfig(model=args.model, data=args.data, batch_size=args.batch, grad_accum=args.accum, steps=args.steps,
                    eval_batches=args.eval_batches, device="cpu")  # fmt: skip
    return cfg, build_task(cfg, torch.device("cpu"))


def gradient_errors(task) -> list[dict]:
    torch.manual_seed(0)
    model = task.build_model()
    task.loss(model, task.train_batch(torch.Generator().manual_seed(0))).backward()
    grads = [p.grad for p in model.parameters()]
    rows = []
    for label, make in ERROR_CONFIGS.items():
        comp = make()
        num = den = dot = out_sq = 0.0
        nbytes = 0
        for i, g in enumerate(grads):
            r = comp.roundtrip(g, salt=i)
            num += float((r - g).pow(2).sum())
            den += float(g.pow(2).sum())
            dot += float((r * g).sum())
            out_sq += float(r.pow(2).sum())
            nbytes += comp.nbytes(g.numel())
        n = sum(g.numel() for g in grads)
        rows.append({"compressor": label, "bits_per_element": 8 * nbytes / n, "relative_error": math.sqrt(num / den),
                     "cosine": dot / math.sqrt(den * out_sq)})  # fmt: skip
    return rows


def train(task, cfg, make_compressor, steps: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = task.build_model()
    opt = eo.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(1, steps // 20)
    schedule = lambda s: (s + 1) / warmup if s < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    acc = GradAccumulator(model, make_compressor()) if make_compressor else None
    gen = torch.Generator().manual_seed(seed)
    losses, t0 = [], time.perf_counter()
    for _ in range(steps):
        total = 0.0
        for _ in range(cfg.grad_accum):
            loss = task.loss(model, task.train_batch(gen)) / cfg.grad_accum
            loss.backward()
            total += loss.item()
        if acc is None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            acc.step(opt, max_norm=cfg.clip)
        sched.step()
        losses.append(total)
    seconds = time.perf_counter() - t0
    tb = eo.training_bytes(model, opt, accumulator=acc)
    n = sum(p.numel() for p in model.parameters())
    val = task.evaluate(model, contextlib.nullcontext)["val_loss"]
    return {"final_train_loss": sum(losses[-10:]) / len(losses[-10:]), "val_loss": val, "grads_bytes": tb["grads"],
            "grad_bytes_per_param": tb["grads"] / n, "total_bytes_per_param": tb["per_param"],
            "seconds_per_step": seconds / steps, "parameters": n}  # fmt: skip


BYTES_CONFIGS = {
    "plain accumulation (fp32 p.grad)": (None, None),
    "8-bit + 8-bit residual, step()": (lambda: ErrorFeedback(Quantize(8)), "step"),
    "4-bit + 8-bit residual, step()": (lambda: ErrorFeedback(Quantize(4)), "step"),
    "2-bit + 8-bit residual, step()": (lambda: ErrorFeedback(Quantize(2)), "step"),
    "2-bit + bf16 residual, step()": (lambda: ErrorFeedback(Quantize(2), residual=Quantize(16)), "step"),
    "4-bit, no feedback, step()": (lambda: NoFeedback(Quantize(4)), "step"),
    "8-bit + 8-bit residual, finish()": (lambda: ErrorFeedback(Quantize(8)), "finish"),
    "gradient release (no accumulation)": ("release", None),
}


class Stack(torch.nn.Module):
    def __init__(self, shapes):
        super().__init__()
        self.weights = torch.nn.ParameterList(make_params(shapes))

    def loss(self) -> torch.Tensor:
        return sum((w * 1e-3).square().sum() for w in self.weights)


def stack_bytes(layers: int, accum: int) -> dict:
    """Training bytes per parameter of each gradient path on a GPT-2-like stack (one real step each)."""
    shapes = gpt2_like_shapes(layers)
    rows = {}
    for label, (make, mode) in BYTES_CONFIGS.items():
        model = Stack(shapes)
        opt = eo.QAdamW(model.parameters(), lr=1e-4, bits=8)
        handle = eo.enable_gradient_release(model, opt) if make == "release" else None
        acc = GradAccumulator(model, make()) if callable(make) else None
        for _ in range(1 if handle else accum):
            (model.loss() / accum).backward()
        if acc is not None and mode == "step":
            acc.step(opt)
        elif acc is not None:
            acc.finish()
            opt.step()
        elif handle is None:
            opt.step()
        tb = eo.training_bytes(model, opt, accumulator=acc)
        n = sum(p.numel() for p in model.parameters())
        rows[label] = {"grads_per_param": tb["grads"] / n, "grad_buffers_per_param": tb["grad_buffers"] / n,
                       "states_per_param": tb["states"] / n, "total_per_param": tb["per_param"], "parameters": n}  # fmt: skip
        del model, opt, acc, handle
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2-tiny", help="harness model preset (default gpt2-tiny)")
    ap.add_argument("--data", default="embedded", help="harness corpus (default embedded)")
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps per configuration (default 100)")
    ap.add_argument("--accum", type=int, default=4, help="micro-batches per step (default 4)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per micro-batch (default 8)")
    ap.add_argument("--seed", type=int, default=0, help="part 2's model initialization and batch order (default 0)")
    ap.add_argument("--eval-batches", type=int, default=8, help="validation batches (default 8)")
    ap.add_argument("--layers", type=int, default=12, help="layers of part 3's GPT-2-like stack (default 12: 85M)")
    ap.add_argument("--part", choices=("all", "bytes"), default="all", help="all parts (default) or only part 3")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    results = {"args": {k: str(v) for k, v in vars(args).items()}}
    if args.part == "all":
        results.update(error_and_training(args))
    print(f"\nGPT-2-like stack, {args.layers} layers: training bytes per parameter after one step of {args.accum} "
          "micro-batches, QAdamW 8-bit states\n")  # fmt: skip
    print(f"{'gradient path':38s} {'grads':>6s} {'of which compressed':>19s} {'states':>6s} {'total':>6s}")
    results["stack_bytes"] = stack_bytes(args.layers, args.accum)
    for label, r in results["stack_bytes"].items():
        print(f"{label:38s} {r['grads_per_param']:6.3f} {r['grad_buffers_per_param']:19.3f} "
              f"{r['states_per_param']:6.3f} {r['total_per_param']:6.3f}")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def error_and_training(args) -> dict:
    """Parts 1 and 2 (printed); their results."""
    cfg, task = make_task(args)
    print(f"{args.model} on {args.data}: gradient of one batch of {args.batch} through each compressor\n")
    print(f"{'compressor':26s} {'bits/elem':>9s} {'rel. error':>10s} {'cosine':>7s}")
    errors = gradient_errors(task)
    for r in errors:
        print(f"{r['compressor']:26s} {r['bits_per_element']:9.3f} {r['relative_error']:10.4f} {r['cosine']:7.4f}")
    print(f"\ntraining {args.steps} steps x {args.accum} micro-batches of {args.batch}, AdamW fp32 moments, clip 1.0, "
          f"seed {args.seed}\n")  # fmt: skip
    print(f"{'gradients':34s} {'grad B/param':>12s} {'total B/param':>13s} {'train loss':>10s} {'val loss':>8s} {'s/step':>7s}")
    runs = {}
    for label, make in TRAIN_CONFIGS.items():
        r = runs[label] = train(task, cfg, make, args.steps, args.seed)
        print(f"{label:34s} {r['grad_bytes_per_param']:12.3f} {r['total_bytes_per_param']:13.3f} "
              f"{r['final_train_loss']:10.4f} {r['val_loss']:8.4f} {r['seconds_per_step']:7.3f}")  # fmt: skip
    return {"errors": errors, "training": runs}


if __name__ == "__main__":
    sys.exit(main())
