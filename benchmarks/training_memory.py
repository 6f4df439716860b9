"""Training bytes per parameter (weights + gradients + optimizer states + weight corrections), measured.

    python benchmarks/training_memory.py
    python benchmarks/training_memory.py --layers 4 --json out/training_memory.json

A GPT-2-small-like stack of parameters (~85M with 12 layers; 1-D vectors included) in the dtype each
configuration asks for takes one real training step (a synthetic loss, ``backward()``, the optimizer step;
with gradient release the step happens inside ``backward()``). ``efficient_optim.training_bytes`` then
counts the tensors: parameters, gradients at the step's peak (all of them without release, the largest
single one with release), optimizer states, weight corrections. The ratio is against fp32 torch AdamW
measured in the same run (16 B/param). Issue targets: best configuration <= 5.6 B/param without gradient
release and <= 3.6 with it.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import gpt2_like_shapes  # noqa: E402

import efficient_optim as eo  # noqa: E402

# label -> (registry name, optimizer kwargs, parameter dtype)
CONFIGS = {
    "torch AdamW, fp32 weights": ("adamw", {}, torch.float32),
    "QAdamW 32-bit, bf16 + 16 correction bits": ("qadamw", {"bits": 32, "correction_bits": 16}, torch.bfloat16),
    "QAdamW 8-bit, bf16 + 8 correction bits": ("qadamw", {"bits": 8, "correction_bits": 8}, torch.bfloat16),
    "QAdamW 4-bit, bf16 + 8 correction bits": ("qadamw", {"bits": 4, "correction_bits": 8}, torch.bfloat16),
    "QAdamW 4-bit, bf16 + stochastic rounding": ("qadamw", {"bits": 4, "weight_rounding": "stochastic"}, torch.bfloat16),
    "HybridAdam, bf16 + 8 correction bits": ("hybrid_adam", {"correction_bits": 8}, torch.bfloat16),
    "HybridAdam, bf16 + stochastic rounding": ("hybrid_adam", {"weight_rounding": "stochastic"}, torch.bfloat16),
}


class Stack(torch.nn.Module):
    def __init__(self, shapes, dtype):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.weights = torch.nn.ParameterList(
            [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(dtype)) for s in shapes]
        )

    def loss(self) -> torch.Tensor:
        return sum((w.float() * 1e-3).square().sum() for w in self.weights)


def measure(name: str, kwargs: dict, dtype: torch.dtype, shapes, release: bool) -> dict | None:
    if name not in eo.list_optimizers():
        print(f"  skipped {name}: not in this version")
        return None
    model = Stack(shapes, dtype)
    opt = eo.create_optimizer(name, model, lr=1e-3, **kwargs)
    handle = eo.enable_gradient_release(model, opt) if release else None
    model.loss().backward()
    if handle is None:
        opt.step()
    tb = eo.training_bytes(model, opt)
    if handle is not None:
        handle.remove()
    del opt, model
    gc.collect()
    return tb


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12, help="layers of the GPT-2-like stack (default 12: ~85M)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    shapes = gpt2_like_shapes(args.layers)
    n = sum(torch.Size(s).numel() for s in shapes)
    print(f"GPT-2-like stack, {args.layers} layers, {n / 1e6:.1f}M parameters\n")
    print(f"{'configuration':46s} {'release':>7s} {'params':>7s} {'grads':>7s} {'states':>7s} {'corr':>7s} {'total B/param':>13s} {'vs AdamW':>9s}")
    results, base = {}, None
    for label, (name, kwargs, dtype) in CONFIGS.items():
        for release in (False, True):
            if release and name == "adamw":
                continue  # torch's optimizers cannot step one parameter at a time
            tb = measure(name, kwargs, dtype, shapes, release)
            if tb is None:
                break
            per = {k: tb[k] / n for k in ("params", "grads", "states", "corrections")}
            base = base or tb["per_param"]
            results[f"{label}{' + release' if release else ''}"] = {**tb, **{f"{k}_per_param": v for k, v in per.items()}}
            print(f"{label:46s} {'yes' if release else 'no':>7s} {per['params']:7.3f} {per['grads']:7.3f} {per['states']:7.3f} "
                  f"{per['corrections']:7.3f} {tb['per_param']:13.3f} {base / tb['per_param']:8.2f}x")  # fmt: skip
    best = min((r["per_param"], k) for k, r in results.items() if "release" not in k)
    best_rel = min(((r["per_param"], k) for k, r in results.items() if "release" in k), default=None)
    print(f"\nbest without release: {best[1]}: {best[0]:.3f} B/param (target <= 5.6)")
    if best_rel:
        print(f"best with release:    {best_rel[1]}: {best_rel[0]:.3f} B/param (target <= 3.6)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
