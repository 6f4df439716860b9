"""Helpers shared by the benchmark scripts: realistic parameter shapes, timing, the copy-bandwidth floor."""

from __future__ import annotations

import statistics
import time

import torch


def gpt2_like_shapes(layers: int = 12, d: int = 768) -> list[tuple[int, ...]]:
    """Weight matrices of a GPT-2-small-like stack (qkv, attn out, mlp in, mlp out per layer) plus the
    1-D LayerNorm and bias vectors: ~85M parameters for 12 x 768."""
    shapes: list[tuple[int, ...]] = []
    for _ in range(layers):
        shapes += [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)]
        shapes += [(3 * d,), (d,), (4 * d,), (d,), (d,), (d,), (d,), (d,)]
    return shapes


def gpt2_like_names(layers: int = 12) -> list[str]:
    """GPT-2 parameter names in the order of ``gpt2_like_shapes`` (for optimizers that group by name: Adam-mini)."""
    names: list[str] = []
    for i in range(layers):
        h = f"h.{i}."
        names += [h + "attn.c_attn.weight", h + "attn.c_proj.weight", h + "mlp.c_fc.weight", h + "mlp.c_proj.weight"]
        names += [h + "attn.c_attn.bias", h + "attn.c_proj.bias", h + "mlp.c_fc.bias", h + "mlp.c_proj.bias",
                  h + "ln_1.weight", h + "ln_1.bias", h + "ln_2.weight", h + "ln_2.bias"]  # fmt: skip
    return names


def make_params(shapes, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=g) * 0.02)
        p.grad = torch.randn(s, generator=g) * 1e-3
        params.append(p)
    return params


def time_steps(step, warmup: int, repeats: int) -> tuple[float, list[float]]:
    """Run ``step`` ``warmup`` times (timed separately) then ``repeats`` times; returns
    (warm-up seconds, list of per-step seconds)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    warm = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return warm, times


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


def copy_bandwidth_gbs(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Memory bandwidth (bytes read + bytes written per second, GB/s) of a large streaming copy.

    The best of a copy into another buffer and an in-place read-modify-write (``x.mul_(1)``): an optimizer
    step updates its tensors in place, and a copy into a separate buffer also pays a read-for-ownership of
    the destination, which understates what an in-place step can reach.
    """
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    best = float("inf")
    for op in (lambda: dst.copy_(src), lambda: src.mul_(1.0)):
        op()
        for _ in range(repeats):
            t = time.perf_counter()
            op()
            best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best / 1e9
