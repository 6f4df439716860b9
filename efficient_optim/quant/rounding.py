"""Reproducible random numbers for stochastic rounding.

A counter-based hash gives element ``i`` of a tensor a uniform number in ``[0, 1)`` from a 32-bit ``salt``
(derived from the user's seed, the parameter, the state and the step). No generator state is carried, so
a resumed run draws exactly the numbers the uninterrupted run would have drawn, and the fused C++ kernel
computes the same numbers as this reference.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
_M1 = 0x85EBCA6B
_M2 = 0xC2B2AE35

ROUNDING_MODES = ("nearest", "stochastic")


def _mul32(a: torch.Tensor, k: int) -> torch.Tensor:
    """``(a * k) mod 2**32`` for int64 tensors holding 32-bit values, without int64 overflow."""
    lo = a * (k & 0xFFFF)
    hi = ((a * (k >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, _M1)
    h = h ^ (h >> 13)
    h = _mul32(h, _M2)
    return h ^ (h >> 16)


def _fmix32_int(h: int) -> int:
    """``_fmix32`` on one Python integer (called per parameter per step: no tensor overhead)."""
    h ^= h >> 16
    h = (h * _M1) & _MASK32
    h ^= h >> 13
    h = (h * _M2) & _MASK32
    return h ^ (h >> 16)


def mix_salt(*parts: int) -> int:
    """Combine integers (seed, parameter index, state id, step) into one 32-bit salt."""
    h = 0x12345678
    for p in parts:
        h = _fmix32_int((h ^ (int(p) & _MASK32)) & _MASK32)
        h = (h + _GOLDEN) & _MASK32
    return h


def uniform_from_hash(numel: int, salt: int, device=None) -> torch.Tensor:
    """``numel`` float32 numbers in ``[0, 1)``: element i is ``fmix32(i * golden + salt) >> 8`` / 2**24."""
    i = torch.arange(numel, dtype=torch.int64, device=device) & _MASK32
    h = _fmix32((_mul32(i, _GOLDEN) + (salt & _MASK32)) & _MASK32)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))
