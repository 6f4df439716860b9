"""Loss landscapes around trained solutions: 2-D surfaces along filter-normalized random directions (Li et al.,
"Visualizing the Loss Landscape of Neural Nets", 2018) and linear mode connectivity between two solutions
(the loss along the straight line between them, and its barrier; Frankle et al., 2020).

Everything here works on a list of parameter tensors and a ``loss_fn()`` closure that evaluates the model
holding them; parameters are moved in place under ``torch.no_grad`` and restored afterwards.

- ``filter_normalized_direction(params, gen)``: a Gaussian direction in which every *filter* (a slice along
  dimension 0 of a parameter: an output unit of a ``Linear`` weight, a row of an embedding, a column block of
  a transformers ``Conv1D`` weight) is rescaled to the norm of the same slice of the parameter, so the
  surface's scale means the same for every layer and for every solution; 1-D parameters (biases, norms) get
  a zero direction, as in the paper's default.
- ``surface_2d``: ``L(theta + a d1 + b d2)`` on a square grid; ``rise_at_radius`` summarizes it as the mean
  loss increase at a given distance from the solution (lower: flatter).
- ``interpolate``: ``L((1 - t) theta_A + t theta_B)`` for ``t`` in [0, 1]; ``barrier`` is the largest
  excess over the straight line between the two end losses (``max_t L(t) - ((1 - t) L(0) + t L(1))``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch


def filter_normalized_direction(params: Sequence[torch.Tensor], gen: torch.Generator) -> list[torch.Tensor]:
    """A random direction shaped like ``params``, each filter scaled to its parameter filter's norm.

    Args:
        params: the solution's parameters (read only).
        gen: the generator the direction is drawn from (the same generator state gives the same raw
            direction for two solutions of one architecture; each is then scaled to its own solution).
    """
    out = []
    for p in params:
        d = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(device=p.device, dtype=p.dtype)
        if p.dim() <= 1:
            out.append(torch.zeros_like(p))
            continue
        w = p.detach().reshape(p.shape[0], -1)
        dd = d.reshape(p.shape[0], -1)
        scale = w.norm(dim=1, keepdim=True) / dd.norm(dim=1, keepdim=True).clamp_min(1e-12)
        out.append((dd * scale).reshape(p.shape))
    return out


def _set(params: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)


def surface_2d(loss_fn: Callable[[], float], params: Sequence[torch.Tensor], d1, d2, span: float = 1.0,
               points: int = 21) -> dict:  # fmt: skip
    """The loss on a ``points x points`` grid of ``theta + a d1 + b d2``, ``a, b`` in ``[-span, span]``.

    Args:
        loss_fn: evaluates the loss of the model holding ``params`` (no gradient needed).
        params: the solution's parameters (moved, then restored).
        d1, d2: directions shaped like ``params`` (e.g. ``filter_normalized_direction``).
        span: half-width of the grid in units of the directions (default 1).
        points: grid points per axis (default 21; odd, so the solution itself is on the grid).

    Returns:
        ``{"coords", "loss"}``: the axis coordinates and ``loss[i][j]`` at ``(coords[i], coords[j])``
        (``a`` along d1 first); a non-finite loss is recorded as ``None``.
    """
    if points < 3 or points % 2 == 0:
        raise ValueError(f"points must be odd and >= 3 (the solution on the grid), got {points}")
    coords = [span * (2 * i / (points - 1) - 1) for i in range(points)]
    theta = [p.detach().clone() for p in params]
    grid = []
    try:
        for a in coords:
            row = []
            for b in coords:
                _set(params, [t + a * x + b * y for t, x, y in zip(theta, d1, d2)])
                value = float(loss_fn())
                row.append(value if math.isfinite(value) else None)
            grid.append(row)
    finally:
        _set(params, theta)
    return {"coords": coords, "loss": grid}


def rise_at_radius(surface: dict, radius: float, width: float | None = None) -> float | None:
    """Mean loss increase over the solution's loss at grid points within ``width / 2`` of distance ``radius``
    from the center (``width``: the grid step by default); ``None`` if no finite point is that far."""
    coords, grid = surface["coords"], surface["loss"]
    mid = len(coords) // 2
    center = grid[mid][mid]
    step = coords[1] - coords[0]
    width = step if width is None else width
    vals = [grid[i][j] for i, a in enumerate(coords) for j, b in enumerate(coords)
            if abs(math.hypot(a, b) - radius) <= width / 2 and grid[i][j] is not None]  # fmt: skip
    if center is None or not vals:
        return None
    return sum(vals) / len(vals) - center


def interpolate(loss_fns: dict[str, Callable[[], float]], params: Sequence[torch.Tensor], theta_a, theta_b,
                points: int = 21) -> dict:  # fmt: skip
    """Losses along ``(1 - t) theta_a + t theta_b``, ``t`` in [0, 1].

    Args:
        loss_fns: name -> closure evaluating the model holding ``params`` (e.g. ``train``, ``val``).
        params: the model's parameters (moved, then restored to their values at the call).
        theta_a, theta_b: the two solutions (tensors shaped like ``params``).
        points: points on the path, both ends included (default 21).

    Returns:
        ``{"t": [...], name: [...] for each loss}`` (``None`` for a non-finite loss).
    """
    if points < 2:
        raise ValueError(f"points must be >= 2, got {points}")
    ts = [i / (points - 1) for i in range(points)]
    keep = [p.detach().clone() for p in params]
    out = {"t": ts, **{k: [] for k in loss_fns}}
    try:
        for t in ts:
            _set(params, [(1 - t) * a + t * b for a, b in zip(theta_a, theta_b)])
            for name, fn in loss_fns.items():
                value = float(fn())
                out[name].append(value if math.isfinite(value) else None)
    finally:
        _set(params, keep)
    return out


def barrier(ts: Sequence[float], losses: Sequence[float | None]) -> dict:
    """The loss barrier of an interpolation path.

    Returns:
        ``{"height", "t", "relative", "over_max_end"}``: the largest ``L(t) - ((1 - t) L(0) + t L(1))`` (0 when
        the path never rises above that line), where it is, that height over the mean of the end losses
        (``None`` when that mean is not positive), and
        ``max_t L(t) - max(L(0), L(1))`` (the other common definition); all ``None`` if a loss is missing.
    """
    if any(v is None for v in losses):
        return {"height": None, "t": None, "relative": None, "over_max_end": None}
    a, b = losses[0], losses[-1]
    excess = [v - ((1 - t) * a + t * b) for t, v in zip(ts, losses)]
    i = max(range(len(excess)), key=excess.__getitem__)
    height = max(0.0, excess[i])
    mean_end = (a + b) / 2
    return {"height": height, "t": ts[i] if height > 0 else None, "relative": height / mean_end if mean_end > 0 else None,
            "over_max_end": max(0.0, max(losses) - max(a, b))}  # fmt: skip
