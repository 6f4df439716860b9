"""Runs a few fused optimizer steps over many map / block-size / rounding combinations and saves every
parameter and state tensor: `python kernel_paths_worker.py OUT.pt`. ``tests/test_kernel_avx2.py`` runs it
once with the kernel's AVX-512 paths and once with a kernel built without them, and compares the bits."""

import itertools
import sys

import torch

import efficient_optim as eo


def trajectories() -> dict:
    out = {}
    combos = itertools.product((8, 4), ("sqrt", "dynamic"), ("sqrt_nozero", "dynamic_nozero"), (16, 40, 256),
                               ("nearest", "stochastic"))  # fmt: skip
    for bits, m_map, v_map, block, rounding in combos:
        g = torch.Generator().manual_seed(block)
        p = torch.nn.Parameter(torch.randn(4096 + 37, generator=g) * 0.1)
        opt = eo.QAdamW([p], lr=1e-2, bits=bits, m_map=m_map, v_map=v_map, m_block_size=block, v_block_size=block,
                        rounding=rounding, min_quantize_numel=0)  # fmt: skip
        for _ in range(3):
            p.grad = torch.randn(p.numel(), generator=g) * torch.logspace(-6, 0, p.numel())
            opt.step()
        st = opt.state[p]
        out[f"qadamw/{bits}/{m_map}/{v_map}/{block}/{rounding}"] = [p.detach()] + [st[k] for k in sorted(st) if torch.is_tensor(st[k])]
    for m_codec in ("4bit", "8bit"):
        g = torch.Generator().manual_seed(7)
        p = torch.nn.Parameter(torch.randn(96, 256, generator=g) * 0.1)
        opt = eo.create_optimizer("hybrid_adam", [p], lr=1e-2, m_codec=m_codec, min_quantize_numel=0)
        for _ in range(3):
            p.grad = torch.randn(p.shape, generator=g) * 1e-2
            opt.step()
        st = opt.state[p]
        out[f"hybrid/{m_codec}"] = [p.detach()] + [st[k] for k in sorted(st) if torch.is_tensor(st[k])]
    return out


if __name__ == "__main__":
    torch.save(trajectories(), sys.argv[1])
