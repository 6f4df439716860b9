"""Optimizer-step time over ~85M parameters in GPT-2-small shapes, ours vs the anchors, in one run.

    python benchmarks/step_speed.py                      # all installed optimizers
    python benchmarks/step_speed.py --only adamw_fused,qadamw8,qadamw4 --repeats 10

Prints per optimizer: median step time, ratio to torch fused fp32 AdamW, and the bandwidth floor of its
bytes moved per step (fp32 Adam: p,g,m,v read + p,m,v written = 28 B/param; 8-bit states: 16; 4-bit: 14)
from the copy bandwidth measured in this run. Warm-up (the first steps: kernel load, torch.compile) is
timed and reported separately. Writes a JSON with the same numbers if ``--json`` is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copy_bandwidth_gbs, gpt2_like_names, gpt2_like_shapes, make_params, median_ms, time_steps  # noqa: E402

import efficient_optim as eo  # noqa: E402

# name -> (factory, bytes moved per parameter per step, for the floor)
CANDIDATES = {
    "adamw_fused": (lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True), 28),
    "adamw_foreach": (lambda p: torch.optim.AdamW(p, lr=1e-3, foreach=True), 28),
    "qadamw8": (lambda p: eo.QAdamW(p, lr=1e-3, bits=8), 16),
    "qadamw4": (lambda p: eo.QAdamW(p, lr=1e-3, bits=4), 14),
    "qadamw8_reference": (lambda p: eo.QAdamW(p, lr=1e-3, bits=8, fused=False), 16),
    "bnb_adamw8bit": (lambda p: eo.create_optimizer("adamw_bnb_8bit", p, lr=1e-3), 16),
    "torchao_adamw8bit": (lambda p: eo.create_optimizer("adamw_torchao_8bit", p, lr=1e-3), 16),
    "torchao_adamw4bit": (lambda p: eo.create_optimizer("adamw_torchao_4bit", p, lr=1e-3), 14),
    "hybrid_adam": (lambda p: eo.create_optimizer("hybrid_adam", p, lr=1e-3), 13),
    "hybrid_adam_m8": (lambda p: eo.create_optimizer("hybrid_adam", p, lr=1e-3, m_codec="8bit"), 14),
    "hybrid_adam_lowrank_m": (lambda p: eo.create_optimizer("hybrid_adam", p, lr=1e-3, m_codec="lowrank"), 12),
    "lowrank_adam": (lambda p: eo.create_optimizer("lowrank_adam", p, lr=1e-3), 12),
    "lowrank_adam_online": (lambda p: eo.create_optimizer("lowrank_adam", p, lr=1e-3, update_strategy="online"), 12),
    "lowrank_adam_periodic": (lambda p: eo.create_optimizer("lowrank_adam", p, lr=1e-3, rank=128, update_strategy="periodic"), 12),
    "adafactor": (lambda p: eo.create_optimizer("adafactor", p, lr=1e-3), 12),
    "adafactor_hf": (lambda p: eo.create_optimizer("adafactor_hf", p, lr=1e-3), 12),
    "lion": (lambda p: eo.create_optimizer("lion", p, lr=1e-4), 20),
    "lion8": (lambda p: eo.create_optimizer("lion8", p, lr=1e-4), 14),
    "lion_bnb_8bit": (lambda p: eo.create_optimizer("lion_bnb_8bit", p, lr=1e-4), 14),
    "sgd_fp32": (lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, foreach=True), 20),
    "sgd8": (lambda p: eo.create_optimizer("sgd8", p, lr=1e-2), 14),
    "galore_adamw": (lambda p: eo.create_optimizer("galore_adamw", p, lr=1e-3), 12),
    "apollo_adamw": (lambda p: eo.create_optimizer("apollo_adamw", p, lr=1e-3), 12),
    "came": (lambda p: eo.create_optimizer("came", p, lr=1e-3), 12),
    # Adam-mini groups parameters by name: given GPT-2 names in the benchmark's order
    "adam_mini": (lambda p: eo.create_optimizer("adam_mini", list(zip(gpt2_like_names(len(p) // 12), p)), lr=1e-3,
                                                dim=int(p[1].shape[0]), n_heads=12), 20),
}
DEFAULT = "adamw_fused,adamw_foreach,qadamw8,qadamw4,bnb_adamw8bit,torchao_adamw8bit,torchao_adamw4bit"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=DEFAULT, help=f"comma-separated subset of {list(CANDIDATES)}")
    ap.add_argument("--layers", type=int, default=12, help="GPT-2-like layers of width 768 (12 -> ~85M params)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps (reported separately)")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps; the median is reported")
    ap.add_argument("--anchor-repeats", type=int, default=3, help="timed steps for the slow anchors (bnb, torchao)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    shapes = gpt2_like_shapes(args.layers)
    n = sum(torch.Size(s).numel() for s in shapes)
    bw = copy_bandwidth_gbs()
    print(f"{n / 1e6:.1f}M parameters in {len(shapes)} tensors; threads={torch.get_num_threads()}; "
          f"copy bandwidth {bw:.1f} GB/s (read+write)")  # fmt: skip
    results = {}
    for name in args.only.split(","):
        factory, moved = CANDIDATES[name]
        try:
            params = make_params(shapes)
            opt = factory(params)
        except (ImportError, ValueError) as exc:
            print(f"{name:20s} skipped: {exc}")
            continue
        slow = ("bnb", "torchao", "galore", "apollo", "came", "adafactor", "lion", "sgd", "hybrid", "adam_mini", "lowrank")
        repeats = args.anchor_repeats if name.startswith(slow) or "reference" in name else args.repeats
        warm, times = time_steps(opt.step, args.warmup, repeats)
        floor_ms = moved * n / (bw * 1e9) * 1e3
        results[name] = {"median_ms": median_ms(times), "warmup_s": warm, "floor_ms": floor_ms,
                         "bytes_per_param_moved": moved, "state_bytes": eo.state_bytes(opt)}  # fmt: skip
        print(f"{name:20s} {median_ms(times):9.1f} ms   warm-up {warm:6.1f} s   floor {floor_ms:6.1f} ms", flush=True)
        del opt, params
    base = results.get("adamw_fused", {}).get("median_ms")
    print("\nname                  step ms   x fused fp32 AdamW   x own floor")
    for name, r in results.items():
        ratio = f"{r['median_ms'] / base:8.2f}x" if base else "     n/a"
        print(f"{name:20s} {r['median_ms']:9.1f}   {ratio:>18s}   {r['median_ms'] / r['floor_ms']:8.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"num_params": n, "copy_gbs": bw, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
