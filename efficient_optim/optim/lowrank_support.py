"""Helpers shared by the low-rank rules (``LowRankAdam``, GaLore, the factor-EMA ablation)."""

from __future__ import annotations

import math

import torch

from ..state.lowrank import LowRank


def encode_state(codec, state: dict, name: str, value: torch.Tensor, salt: int, ws) -> None:
    """``codec.encode``, handing a ``LowRank`` codec the shared SVD workspace ``ws``."""
    if isinstance(codec, LowRank):
        codec.encode(state, name, value, salt=salt, workspace=ws)
    else:
        codec.encode(state, name, value, salt=salt)


def svdvals(x: torch.Tensor) -> torch.Tensor | None:
    """Singular values of ``x``; None when the SVD does not converge."""
    try:
        return torch.linalg.svdvals(x)
    except RuntimeError:
        return None


def outside_fraction(g: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """``sqrt(1 - ||coeffs||^2 / ||g||^2)``: the relative norm of ``g`` outside an orthonormal basis whose
    coefficients (or the singular values it keeps) are ``coeffs``."""
    g2 = g.square().sum()
    c2 = coeffs.square().sum()
    return torch.where(g2 > 0, (1 - c2 / g2.clamp_min(1e-38)).clamp_min(0).sqrt(), torch.zeros_like(g2))


def as_float(x) -> float | None:
    """A finite Python float, or None (missing or non-finite)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None
