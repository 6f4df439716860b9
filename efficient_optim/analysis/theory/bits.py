"""Bits vs reachable accuracy: how close to the optimum can an iteration get when something is stored at b bits?

Two things can be stored at ``b`` bits (2..8), block-wise with absmax scales and a signed linear map of
``2**b - 1`` levels (``linear_levels``; at 4 and 8 bits the library's ``linear`` map), through the library's
own codecs (``state.Quantized`` with that map, wrapped in ``state.error_feedback.ErrorFeedback`` with an fp32
residual for "with error feedback"):

- ``weights``: the iterate itself. Gradient descent ``x_{t+1} = Q(x_t - lr grad f(x_t))`` with ``lr = 1/L``.
  A format with ``b`` bits per coordinate cannot hold a point closer to ``x*`` than the rounding of ``x*``
  itself (``best_representable``): the lower bound, which falls by one bit per halving of epsilon, the
  ``bits >= log2(1/eps) + c`` bound of describing a point to accuracy eps. Nearest rounding stalls far above it
  (a step smaller than half a level is lost; in the flat directions of an ill-conditioned problem that
  happens early), stochastic rounding keeps moving but leaves a noise ball, error feedback (the classic
  ``decay = 1``: the lost part is added to the next step) lets the stored point oscillate within about one
  level of ``x*``.
- ``momentum``: the heavy-ball buffer ``m_{t+1} = Q(beta m_t + grad f(x_t))``, ``x_{t+1} = x_t - lr m_{t+1}``
  with fp32 weights. A block's scale follows the state's own size, so the error is relative and shrinks with
  the gradient: no ``log2(1/eps)`` floor applies, until the relative error is too large for the iteration to
  contract.

``reachable_eps`` returns the median relative distance ``||x_t - x*|| / ||x*||`` over the last 10 % of steps;
``bits=32`` runs the same iteration in plain fp32, the reference: fp32 weights have a floor of their own, the
same stall at 24 bits of mantissa (a step below half an fp32 ulp of the weight is lost), which scales as
``1 / (lr mu)``.
"""

from __future__ import annotations

import math

import torch

from ...quant import QuantMap
from ...state.dense import Dense
from ...state.error_feedback import ErrorFeedback
from ...state.quantized import Quantized
from .problems import Problem

TARGETS = ("weights", "momentum")
BITS = tuple(range(2, 9))
DIVERGED = 1e3  # relative distance beyond which an iteration counts as diverged


def linear_levels(bits: int) -> torch.Tensor:
    """The ``2**bits - 1`` signed levels ``k / (2**(bits-1) - 1)``, ``k = -(2**(bits-1) - 1) .. 2**(bits-1) - 1``."""
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 2 to 8, got {bits!r}")
    half = 2 ** (bits - 1) - 1
    return torch.arange(-half, half + 1, dtype=torch.float64).div(half).to(torch.float32)


def codec(bits: int, rounding: str = "nearest", feedback: bool = False, block_size: int = 64):
    """A ``Quantized`` codec holding ``bits``-bit linear codes (in 4-bit containers up to 4 bits, 8-bit
    ones above), optionally with error feedback (fp32 residual, decay 1); ``bits=32``: plain fp32
    (``Dense``), the unquantized reference."""
    if bits == 32:
        return Dense(torch.float32)
    container = 4 if bits <= 4 else 8
    qmap = QuantMap("linear", container, True, linear_levels(bits))
    inner = Quantized(container, block_size, qmap, True, rounding)
    return ErrorFeedback(inner, residual=torch.float32) if feedback else inner


def best_representable(problem: Problem, bits: int, block_size: int = 64) -> float:
    """``||Q(x*) - x*|| / ||x*||`` with nearest rounding: the closest the ``bits``-bit format gets to ``x*``."""
    c = codec(bits, "nearest", False, block_size)
    state: dict = {}
    x = problem.x_star.float()
    c.init(state, "x", x)
    c.encode(state, "x", x.clone())
    stored = c.decode(state, "x", x).double()
    return float((stored - problem.x_star).norm() / problem.x_star.norm())


def reachable_eps(problem: Problem, target: str, bits: int, rounding: str = "nearest", feedback: bool = False,
                  steps: int = 1000, beta: float = 0.9, block_size: int = 64) -> dict:  # fmt: skip
    """Run the iteration with ``target`` stored at ``bits`` bits and return how close it got.

    Args:
        problem: a problem with a known optimum (``theory.problems``); starts at its ``x0``.
        target: ``weights`` (gradient descent, lr = 1/L) or ``momentum`` (heavy ball, lr = (1 - beta)/L).
        bits: 2..8, or 32 for the unquantized fp32 reference.
        rounding: ``nearest`` (default) or ``stochastic``.
        feedback: wrap the codec in ``ErrorFeedback`` (fp32 residual, decay 1). Default False.
        steps: iterations (default 1000).
        beta: heavy-ball momentum for ``momentum`` (default 0.9).
        block_size: elements per quantization block (default 64: a row of the 64 x 64 problems).

    Returns:
        ``{"eps", "final", "curve", "diverged_at"}``: the median relative distance to ``x*`` over the last 10 %
        of steps, the last one, the distance every ``steps // 50`` steps, and the step where the distance
        passed 1e3 or stopped being finite (``eps`` and ``final`` are then ``inf``), else ``None``.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    c = codec(bits, rounding, feedback, block_size)
    state: dict = {}
    x = problem.x0.clone().float()
    norm = float(problem.x_star.norm())
    m = torch.zeros_like(x)
    name = "x" if target == "weights" else "m"
    c.init(state, name, x)
    if target == "weights":
        c.encode(state, "x", x.clone(), salt=0)
    dists, curve = [], []
    every = max(1, steps // 50)
    for t in range(steps):
        if target == "weights":
            x = c.decode(state, "x", x).clone()
            c.encode(state, "x", x - problem.grad(x) / problem.L, salt=t + 1)
            x = c.decode(state, "x", x)
        else:
            m = c.decode(state, "m", m).clone()
            c.encode(state, "m", beta * m + problem.grad(x), salt=t + 1)
            x = x - (1 - beta) / problem.L * c.decode(state, "m", m)
        d = float((x.double() - problem.x_star).norm()) / norm
        if not d < DIVERGED:  # not finite, or far beyond the start: the iteration diverged
            return {"eps": math.inf, "final": math.inf, "curve": curve, "diverged_at": t + 1}
        dists.append(d)
        if t % every == 0 or t == steps - 1:
            curve.append([t + 1, d])
    tail = sorted(dists[-max(1, steps // 10) :])
    return {"eps": tail[len(tail) // 2], "final": dists[-1], "curve": curve, "diverged_at": None}


def bits_needed(eps_by_bits: dict[int, float], target_eps: float) -> int | None:
    """The fewest bits whose reachable eps is at or below ``target_eps`` (``None``: none of them)."""
    ok = [b for b, e in sorted(eps_by_bits.items()) if e is not None and e <= target_eps]
    return ok[0] if ok else None
