"""The NaN/Inf check an optimizer runs on every gradient before it changes anything."""

from __future__ import annotations

import torch

from ..kernels.cpu import load_cpu_kernels
from ..state import sharded


def first_nonfinite(work) -> int | None:
    """The index of the first parameter whose gradient holds a NaN or Inf, or None.

    Args:
        work: the optimizer's step plan, ``[(group, [(parameter index, parameter, gradient), ...]), ...]``.

    Plain contiguous fp32 CPU gradients are scanned by the compiled kernel in one call for the whole model (one
    parallel region; per-tensor calls cost as much in thread start-up as the reading); others one at a time,
    and DTensor (FSDP2) gradients shard by shard with every rank agreeing (``state/sharded.py``).
    """
    kernels = load_cpu_kernels()

    def plain(g: torch.Tensor) -> bool:
        return (kernels is not None and not sharded.is_dtensor(g) and g.device.type == "cpu"
                and g.dtype == torch.float32 and g.is_contiguous())  # fmt: skip

    items = [(index, g) for _, group_items in work for index, _, g in group_items]
    if items and all(plain(g) for _, g in items):
        pos = kernels.first_nonfinite_f32([g for _, g in items])
        return None if pos < 0 else items[pos][0]

    def bad(g: torch.Tensor) -> bool:
        if plain(g):
            return bool(kernels.any_nonfinite_f32(g))
        return not bool(torch.isfinite(g).all())

    return sharded.first_nonfinite(work, bad)
