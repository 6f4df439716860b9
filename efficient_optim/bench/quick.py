"""Quick optimizer comparison on a small LM: same data, same seeds, same schedule for every optimizer.

    effopt bench                                   # embedded corpus, 1 seed, ~3 minutes on 2 cores
    effopt bench --data ../shared/data/tinyshakespeare.txt --seeds 3 --steps 400 --optimizers adamw,qadamw8,qadamw4
    effopt bench --optimizers adamw,qadamw4+m_map=softsign+rounding=stochastic

A GPT-2 model built from a ``transformers`` config (2 layers, width 128, 4 heads, context 128, byte-level
vocabulary of 256: ~0.46M parameters, every 128x128+ matrix quantized) trains on the bytes of a text file
with linear warm-up + cosine decay and clipping at 1.0. Prints final train / validation loss per
optimizer (mean +- std over seeds), the relative gap to AdamW and the exact optimizer-state bytes, and
writes ``summary.json`` (one row per run) to ``--out``. The default corpus is the running interpreter's
own standard-library sources: no download, on any machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import efficient_optim as eo

DEFAULT_OPTIMIZERS = ("adamw", "qadamw8", "qadamw4", "adamw_bnb_8bit")


def stdlib_corpus(limit: int = 2_000_000) -> bytes:
    """The running interpreter's own standard-library sources (sorted, first ``limit`` bytes): text that
    every machine with Python has, so the check runs with no download and no shared data."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    out = bytearray()
    for f in sorted(root.glob("*.py")):
        out += f.read_bytes()
        if len(out) >= limit:
            break
    return bytes(out[:limit])


def load_bytes(path: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    raw = path.read_bytes() if path is not None else stdlib_corpus()
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(torch.long)
    split = int(0.9 * data.numel())
    return data[:split], data[split:]


def make_model(seed: int, layers: int, width: int, ctx: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=256, n_positions=ctx, n_embd=width, n_layer=layers, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    return GPT2LMHeadModel(cfg)


def batch(data: torch.Tensor, gen: torch.Generator, bs: int, ctx: int) -> torch.Tensor:
    idx = torch.randint(0, data.numel() - ctx - 1, (bs,), generator=gen)
    return torch.stack([data[i : i + ctx + 1] for i in idx.tolist()])


@torch.no_grad()
def evaluate(model, data: torch.Tensor, bs: int, ctx: int, batches: int = 16) -> float:
    gen = torch.Generator().manual_seed(1234)  # the same validation batches for every run
    model.eval()
    total = 0.0
    for _ in range(batches):
        xb = batch(data, gen, bs, ctx)
        logits = model(xb[:, :-1]).logits
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, 256), xb[:, 1:].reshape(-1)).item()
    model.train()
    return total / batches


def parse_variant(spec: str) -> tuple[str, dict]:
    """``qadamw4+m_map=softsign+rounding=stochastic`` -> ("qadamw4", {"m_map": "softsign", ...})."""
    name, *pairs = spec.split("+")
    kw = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        kw[key] = int(value) if value.isdigit() else value
    return name, kw


def run(spec: str, seed: int, args, train, val) -> dict:
    model = make_model(seed, args.layers, args.width, args.ctx)
    name, kw = parse_variant(spec)
    opt = eo.create_optimizer(name, model, lr=args.lr, weight_decay=0.1, **kw)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))
    )
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    recent = []
    for _ in range(args.steps):
        xb = batch(train, gen, args.batch, args.ctx)
        logits = model(xb[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), xb[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        recent = (recent + [loss.item()])[-20:]
    return {"optimizer": spec, "seed": seed, "train_loss": statistics.mean(recent),
            "val_loss": evaluate(model, val, args.batch, args.ctx), "state_bytes": eo.state_bytes(opt),
            "seconds": time.perf_counter() - t0}  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="effopt bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None,
                    help="text file (default: the Python standard library's own sources, embedded)")
    ap.add_argument("--optimizers", default=None,
                    help="registry names, optionally with settings: qadamw4+m_map=softsign+rounding=stochastic "
                    f"(default: {','.join(DEFAULT_OPTIMIZERS)}, those installed)")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--out", type=Path, default=Path("runs/bench"), help="folder for summary.json (default runs/bench)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=128)
    args = ap.parse_args(argv)
    if args.data is not None and not args.data.is_file():
        print(f"error: data file not found: {args.data}", file=sys.stderr)
        return 2
    if args.optimizers is None:
        names = [n for n in DEFAULT_OPTIMIZERS if eo.registry.optimizer_entry(n).available()]
        skipped = [n for n in DEFAULT_OPTIMIZERS if n not in names]
        if skipped:
            print(f"skipped (package not installed): {', '.join(skipped)}")
    else:
        names = args.optimizers.split(",")
    for spec in names:
        name = parse_variant(spec)[0]
        try:
            entry = eo.registry.optimizer_entry(name)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if not entry.available():
            print(f"error: optimizer {name!r} needs the package {entry.requires!r} (pip install {entry.requires})", file=sys.stderr)
            return 2
    print(f"data: {args.data or 'Python standard library sources (embedded default)'}")
    train, val = load_bytes(args.data)
    rows = []
    for name in names:
        for seed in range(args.seeds):
            r = run(name, seed, args, train, val)
            rows.append(r)
            print(f"{name:24s} seed {seed}: train {r['train_loss']:.4f} val {r['val_loss']:.4f} "
                  f"({r['seconds']:.0f} s, {r['state_bytes']:,} state bytes)", flush=True)  # fmt: skip
    print(f"\n{'optimizer':24s} {'val loss (mean +- std)':>24s} {'vs adamw':>9s} {'state bytes':>12s}")
    by = {n: [r for r in rows if r["optimizer"] == n] for n in names}
    base = statistics.mean(r["val_loss"] for r in by["adamw"]) if "adamw" in by else None
    for n, rs in by.items():
        vals = [r["val_loss"] for r in rs]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        gap = f"{(statistics.mean(vals) / base - 1) * 100:+8.2f}%" if base else "     n/a"
        print(f"{n:24s} {statistics.mean(vals):15.4f} +- {sd:.4f} {gap} {rs[0]['state_bytes']:12,d}")
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / "summary.json.tmp"
    tmp.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": rows}, indent=2))
    os.replace(tmp, args.out / "summary.json")
    print(f"\nwrote {args.out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
