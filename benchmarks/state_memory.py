"""Optimizer-state bytes per parameter, ours vs the anchors, counted from what each optimizer really holds.

    python benchmarks/state_memory.py
    python benchmarks/state_memory.py --json out/state_memory.json

Two workloads: one large matrix (4096 x 4096, where the per-matrix targets apply: 8-bit <= 2.05 B/param,
4-bit <= 1.05 B/param) and a GPT-2-small-like stack (~85M parameters including 1-D LayerNorm/bias
vectors, which every optimizer here keeps in fp32). Every optimizer takes one step so its states exist;
``efficient_optim.state_bytes`` counts each storage once (shared maps once; torchao's tensor subclasses
opened to their codes and scales). Ratios are against torch AdamW measured in the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import gpt2_like_names, gpt2_like_shapes, make_params  # noqa: E402

import efficient_optim as eo  # noqa: E402

CANDIDATES = {
    "torch AdamW (fp32)": ("adamw", {}),
    "QAdamW 8-bit": ("qadamw8", {}),
    "QAdamW 4-bit": ("qadamw4", {}),
    "QAdamW 8-bit, fp32 scales": ("qadamw8", {"scale_dtype": "float32"}),
    "QAdamW 4-bit, fp32 scales": ("qadamw4", {"scale_dtype": "float32"}),
    "bitsandbytes AdamW8bit": ("adamw_bnb_8bit", {}),
    "torchao AdamW8bit": ("adamw_torchao_8bit", {}),
    "torchao AdamW4bit": ("adamw_torchao_4bit", {}),
    "HybridAdam (4-bit m, factored v)": ("hybrid_adam", {}),
    "HybridAdam (8-bit m, factored v)": ("hybrid_adam", {"m_codec": "8bit"}),
    "HybridAdam (fp32 m, factored v)": ("hybrid_adam", {"m_codec": "fp32"}),
    "HybridAdam (4-bit m, 4-bit v)": ("hybrid_adam", {"v_codec": "4bit"}),
    "HybridAdam (rank-16 m, factored v)": ("hybrid_adam", {"m_codec": "lowrank"}),
    "LowRankAdam (rank 16 m online, factored v)": ("lowrank_adam", {}),
    "LowRankAdam (rank 128 m online, factored v)": ("lowrank_adam", {"rank": 128}),
    "LowRankAdam (GaLore-style periodic, rank 128)": ("lowrank_adam", {"rank": 128, "update_strategy": "periodic"}),
    "Adafactor (ours)": ("adafactor", {}),
    "Adafactor (transformers)": ("adafactor_hf", {}),
    "Adafactor + 8-bit m (ours)": ("adafactor", {"beta1": 0.9, "m_bits": 8}),
    "Adafactor + fp32 m (transformers)": ("adafactor_hf", {"beta1": 0.9}),
    "Lion (fp32 m)": ("lion", {}),
    "Lion 8-bit m (ours)": ("lion8", {}),
    "bitsandbytes Lion8bit": ("lion_bnb_8bit", {}),
    "torch SGD momentum": ("sgd", {}),
    "SGD 8-bit momentum (ours)": ("sgd8", {}),
    "GaLore AdamW (rank 128)": ("galore_adamw", {}),
    "APOLLO AdamW (rank 256)": ("apollo_adamw", {}),
    "CAME": ("came", {}),
    "Adam-mini": ("adam_mini", {"dim": 768, "n_heads": 12}),  # given GPT-2 names (it groups by name)
}


def measure(name: str, kwargs: dict, shapes, names: list[str]) -> float | None:
    params = make_params(shapes)
    try:
        arg = list(zip(names, params)) if name == "adam_mini" else params
        opt = eo.create_optimizer(name, arg, lr=1e-3, **kwargs)
    except (ImportError, ValueError) as exc:
        print(f"  skipped {name}: {exc}")
        return None
    opt.step()
    total = eo.state_bytes(opt)
    del opt, params
    gc.collect()
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12, help="layers of the GPT-2-like stack (default 12: ~85M)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--only", help="comma-separated subset of the row labels' registry names (anchors always run)")
    args = ap.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    workloads = {"4096x4096 matrix": ([(4096, 4096)], ["h.0.mlp.c_fc.weight"]),
                 "GPT-2-like stack": (gpt2_like_shapes(args.layers), gpt2_like_names(args.layers))}  # fmt: skip
    results: dict = {}
    for wname, (shapes, names) in workloads.items():
        n = sum(torch.Size(s).numel() for s in shapes)
        print(f"\n{wname}: {n / 1e6:.1f}M parameters")
        print(f"{'optimizer':36s} {'state bytes':>14s} {'B/param':>9s} {'vs AdamW':>9s}")
        base = None
        for label, (name, kw) in CANDIDATES.items():
            if only is not None and name not in only and name != "adamw":
                continue
            total = measure(name, kw, shapes, names)
            if total is None:
                continue
            base = base or total
            results.setdefault(wname, {})[label] = {"state_bytes": total, "bytes_per_param": total / n}
            print(f"{label:36s} {total:14,d} {total / n:9.4f} {base / total:8.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
