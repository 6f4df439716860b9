"""What the adaptive-precision monitoring costs: training-step time with ``Budget(allocator="dynamic")`` (error
statistics measured every ``--every`` steps, re-planned the step after) against the same budget planned once by
the fixed rule (no monitoring), on the harness's ``gpt2-mini`` LM, in one run.

    python benchmarks/budget_overhead.py                       # 200 timed steps, re-plan every 50
    python benchmarks/budget_overhead.py --steps 100 --every 25 --bytes-per-param 1.5

Prints the median and mean step time of each (forward + backward + optimizer step), the mean time of the
monitoring steps alone, and the overhead of monitoring as a ratio of the training step (mean over a whole
re-plan period, which is what a run pays). Measure on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import efficient_optim as eo
from efficient_optim.bench.models import build_lm
from efficient_optim.policy import Budget
from efficient_optim.third_party import ChatterLog, chatter_to, quiet


def _timed_run(model, opt, steps: int, warmup: int, batch: int, context: int, vocab: int) -> list[float]:
    gen = torch.Generator().manual_seed(0)
    times = []
    for i in range(warmup + steps):
        x = torch.randint(0, vocab, (batch, context + 1), generator=gen)
        t = time.perf_counter()
        logits = model(x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200, help="timed steps per configuration (default 200)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed first steps (default 5)")
    ap.add_argument("--every", type=int, default=50, help="steps between re-plans of the dynamic allocator (default 50)")
    ap.add_argument("--bytes-per-param", type=float, default=1.5, help="the budget (default 1.5 bytes/parameter)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per batch (default 8)")
    ap.add_argument("--context", type=int, default=128, help="tokens per sequence (default 128)")
    args = ap.parse_args(argv)
    vocab = 256
    torch.manual_seed(0)
    rows = {}
    for name, allocator in (("fixed plan, no monitoring", "fixed"), ("dynamic, monitored", "dynamic")):
        with chatter_to(ChatterLog()), quiet("transformers"):  # its imports' warnings are not this benchmark's output
            model = build_lm("gpt2-mini", vocab, seed=0)
        policy = Budget(bytes_per_param=args.bytes_per_param, allocator=allocator, warmup=args.warmup + 1,
                        every=args.every, patience=2)  # fmt: skip
        opt = eo.QAdamW(model.named_parameters(), lr=1e-3, policy=policy)
        times = _timed_run(model, opt, args.steps, args.warmup, args.batch, args.context, vocab)
        monitored = [t for i, t in enumerate(times, start=args.warmup + 1)
                     if allocator == "dynamic" and i >= policy.warmup and (i - policy.warmup) % args.every == 0]  # fmt: skip
        rows[name] = (times, monitored, policy)
    base = statistics.mean(rows["fixed plan, no monitoring"][0])
    print(f"gpt2-mini, batch {args.batch} x {args.context} tokens, {args.steps} timed steps, budget "
          f"{args.bytes_per_param} B/param, re-plan every {args.every} steps (one run; a hint, not a finding)\n")
    print(f"{'configuration':28s} {'median ms':>10s} {'mean ms':>9s} {'monitor-step ms':>16s} {'transitions':>12s}")
    for name, (times, monitored, policy) in rows.items():
        mon = f"{statistics.mean(monitored) * 1e3:.1f}" if monitored else "-"
        print(f"{name:28s} {statistics.median(times) * 1e3:10.1f} {statistics.mean(times) * 1e3:9.1f} {mon:>16s} "
              f"{policy.transitions:12d}")  # fmt: skip
    dyn = statistics.mean(rows["dynamic, monitored"][0])
    print(f"\nmonitoring overhead: {100 * (dyn - base) / base:+.1f} % of the training step (target <= 3 %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
