"""Step time and state bytes of LowRankAdam variants vs torch AdamW on the benchmark's GPT-2 (protocol P7).

    python benchmarks/lowrank_step_time.py                       # gpt2-tiny (width 128), the P7 specs
    python benchmarks/lowrank_step_time.py --width 256 --rounds 40 --json out/lowrank_step.json

Timings on a shared machine drift with its load, so the optimizers are timed *interleaved*: every round
steps each optimizer once (each on its own copy of the model, with the same fixed gradients) and times a
forward+backward pass of the model; the medians over rounds are reported. The full training step is
forward+backward + optimizer step, and its ratio to AdamW's is what P7's "step time <= +15 %" is about.
State bytes come from ``efficient_optim.state_bytes`` (for LowRankAdam they include the SVD workspace).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import efficient_optim as eo
from efficient_optim.bench.config import RunConfig, parse_spec
from efficient_optim.bench.tasks import build_task

DEFAULT_SPECS = ("adamw,lowrank_adam+rank=8,lowrank_adam+rank=16,lowrank_adam+rank=32,"
                 "lowrank_adam+rank=16+update_strategy=randomized,"
                 "lowrank_adam+rank=16+update_strategy=randomized+svd_freq=1,"
                 "lowrank_adam+rank=16+update_strategy=periodic,lowrank_adam+rank=16+update_strategy=factor_ema")  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--specs", default=DEFAULT_SPECS, help="comma-separated optimizer specs (name+key=value)")
    ap.add_argument("--data", default="embedded", help="corpus (only shapes the vocabulary; default embedded)")
    ap.add_argument("--width", type=int, default=None, help="model width (default: the preset's, 128)")
    ap.add_argument("--layers", type=int, default=None, help="model layers (default: the preset's, 2)")
    ap.add_argument("--rounds", type=int, default=30, help="timed rounds (default 30)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per optimizer first (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = RunConfig(optimizer="adamw", data=args.data, width=args.width, layers=args.layers, device="cpu")
    task = build_task(cfg, torch.device("cpu"))
    base = task.build_model()
    batch = task.train_batch(torch.Generator().manual_seed(0))
    task.loss(base, batch).backward()
    grads = [p.grad.clone() for p in base.parameters()]

    specs = [s for s in args.specs.split(",") if s]
    runs = {}
    for spec in specs:
        model = copy.deepcopy(base)
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        name, kw = parse_spec(spec)
        opt = eo.create_optimizer(name, model, lr=1e-4, **kw)
        for _ in range(args.warmup):
            opt.step()
        runs[spec] = {"opt": opt, "model": model, "times": []}
    fb_times = []
    for _ in range(args.rounds):
        t = time.perf_counter()
        base.zero_grad(set_to_none=True)
        task.loss(base, batch).backward()
        fb_times.append(time.perf_counter() - t)
        for spec in specs:
            t = time.perf_counter()
            runs[spec]["opt"].step()
            runs[spec]["times"].append(time.perf_counter() - t)

    n = sum(p.numel() for p in base.parameters())
    fb = statistics.median(fb_times) * 1e3
    ref = statistics.median(runs[specs[0]]["times"]) * 1e3
    rows = []
    print(f"model {cfg.model} width {args.width or 'preset'} layers {args.layers or 'preset'}: {n:,} parameters; "
          f"forward+backward {fb:.1f} ms (median of {args.rounds}); threads {torch.get_num_threads()}")  # fmt: skip
    print(f"{'optimizer':58s} {'opt ms':>8s} {'x ' + specs[0]:>10s} {'step ms':>8s} {'step x':>7s} {'state B':>10s} {'B/param':>8s}")
    for spec in specs:
        opt = runs[spec]["opt"]
        ms = statistics.median(runs[spec]["times"]) * 1e3
        sb = eo.state_bytes(opt)
        row = {"spec": spec, "opt_ms": ms, "opt_ratio": ms / ref, "step_ms": fb + ms, "step_ratio": (fb + ms) / (fb + ref),
               "state_bytes": sb, "bytes_per_param": sb / n, "forward_backward_ms": fb}  # fmt: skip
        rows.append(row)
        print(f"{spec:58s} {ms:8.2f} {row['opt_ratio']:9.2f}x {row['step_ms']:8.1f} {row['step_ratio']:6.3f}x "
              f"{sb:10,d} {sb / n:8.3f}")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"params": n, "rounds": args.rounds, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
