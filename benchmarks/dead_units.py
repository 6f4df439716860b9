"""How far the first two steps move a weight on a model whose units die between steps, per optimizer.

Linear(32 -> 1024) - ReLU - Linear(1024 -> 128), batch 4, random targets, lr 1e-3, two steps, seeds 0..N-1:
units active on the first batch and dead on the second get a zero gradient after a tiny one. Exact AdamW
moves no weight by more than ~2 lr; a compressed state that decodes v as 0 (or m far above its value) under
such a unit moves it by orders of magnitude more. Prints the largest move per seed and its ratio to AdamW's
in the same run.

    python benchmarks/dead_units.py [--seeds 3]
"""

from __future__ import annotations

import argparse

import torch

import efficient_optim as eo

CONFIGS = {
    "adamw (torch)": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
    "qadamw8 (default: v dynamic_nozero)": lambda ps: eo.QAdamW(ps, lr=1e-3, bits=8),
    "qadamw8, v_map=dynamic (zero level)": lambda ps: eo.QAdamW(ps, lr=1e-3, bits=8, v_map="dynamic"),
    "qadamw4 (default)": lambda ps: eo.QAdamW(ps, lr=1e-3, bits=4),
    "hybrid_adam (default: 4-bit stochastic m)": lambda ps: eo.HybridAdam(ps, lr=1e-3),
    "hybrid_adam, m_rounding=nearest": lambda ps: eo.HybridAdam(ps, lr=1e-3, m_rounding="nearest"),
    "hybrid_adam, m_codec=8bit": lambda ps: eo.HybridAdam(ps, lr=1e-3, m_codec="8bit"),
}


def largest_move(make, seed: int) -> float:
    """The largest |change| of any weight after two steps of the optimizer ``make(params)``."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 128))
    before = [p.detach().clone() for p in model.parameters()]
    opt = make(model.parameters())
    for _ in range(2):
        x, y = torch.randn(4, 32), torch.randn(4, 128)
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        opt.step()
    return max(float((p.detach() - b).abs().max()) for p, b in zip(model.parameters(), before))


def main(argv: list[str] | None = None) -> None:
    """Print the table; ``argv``: command-line arguments (default: ``sys.argv[1:]``)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    args = ap.parse_args(argv)
    rows = {name: [largest_move(make, s) for s in range(args.seeds)] for name, make in CONFIGS.items()}
    reference = max(rows["adamw (torch)"])
    print("| optimizer | largest move per seed (lr 1e-3, 2 steps) | worst / AdamW's worst |\n|---|---|---:|")
    for name, moves in rows.items():
        print(f"| {name} | {', '.join(f'{m:.4f}' for m in moves)} | {max(moves) / reference:.1f}x |")


if __name__ == "__main__":
    main()
