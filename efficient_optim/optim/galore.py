"""GaLore (Zhao et al. 2024) as its own update rule: Adam inside a periodically refreshed low-rank subspace.

Every ``svd_freq`` steps the projection ``P`` (top-r left singular vectors of the gradient, by randomized SVD)
is refreshed; both moments live in the r x n projected space and the Adam direction is projected back:
``W -= lr * scale * P (m_hat / (sqrt(v_hat) + eps))``. On a refresh the moments are rotated into the new basis
(``m <- C m``, ``v <- (C*C) v`` with ``C = P_new^T P_old``; the part of v with no counterpart in the old basis
gets the old column mean): GaLore keeps them unrotated. The states are not codecs of the full moment: they
are the rule's own (``ProjectedMoment``, ``Projection``). ``GaLoreAdamW`` (registry name ``galore``) runs it;
``LowRankAdam(update_strategy="periodic")`` is the same rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..state import StateCodec
from ..state.lowrank import Arena, LowRankFailure, fallback_basis, matrix_shape, randomized_svd
from .lowrank_support import outside_fraction


def _oriented(param: torch.Tensor) -> tuple[int, int]:
    """(short, long) sides of the parameter's matrix: GaLore projects the short side."""
    m, n = matrix_shape(param)
    return min(m, n), max(m, n)


@dataclass(frozen=True)
class ProjectedMoment(StateCodec):
    """A GaLore moment: an r x (long side) tensor in the projected space (not param-shaped)."""

    rank: int

    @property
    def error_kind(self) -> str:
        return "lowrank"  # the moment of the projected gradient: what lies outside the subspace is dropped

    def expected(self, name, param):
        return {name: ((self.rank, _oriented(param)[1]), torch.float32)}

    def init(self, state, name, param):
        state[name] = torch.zeros(self.rank, _oriented(param)[1], dtype=torch.float32, device=param.device)

    def decode(self, state, name, param):
        return state[name]

    def encode(self, state, name, value, *, salt=0):
        if value is not state[name]:
            state[name].copy_(value)


@dataclass(frozen=True)
class Projection(StateCodec):
    """GaLore's projection ``P`` (short side x r, orthonormal) and ``meta = [refreshes, svd_failures]``."""

    rank: int

    @property
    def error_kind(self) -> str:
        return "none"  # the basis itself, stored exactly

    def expected(self, name, param):
        return {name: ((_oriented(param)[0], self.rank), torch.float32), f"{name}.meta": ((2,), torch.int64)}

    def init(self, state, name, param):
        for key, (shape, dtype) in self.expected(name, param).items():
            state[key] = torch.zeros(shape, dtype=dtype, device=param.device)

    def decode(self, state, name, param):
        return state[name]

    def encode(self, state, name, value, *, salt=0):
        state[name].copy_(value)



def galore_step(group: dict, p, g, state: dict, step: int, ws, *, proj_salt: int, every: int) -> dict:
    """GaLore: Adam on the projected gradient ``P^T G``, the direction projected back with ``P``.

    ``p``, ``g``: the parameter and its gradient (fp32 or fp64 working views; ``p`` updated in place);
    ``state``: the parameter's states (``exp_avg``/``exp_avg_sq`` in the projected space, ``proj`` and
    ``proj.meta``); ``step``: the step number; ``ws``: scratch for the randomized SVD (or None);
    ``proj_salt``: seed of this step's random test matrix; ``every``: steps between projection refreshes.
    Returns the diagnostics (``grad_error``: the part of the gradient outside the projection).
    """
    beta1, beta2 = group["betas"]
    r = group["rank"]
    gm = g.reshape(matrix_shape(p))
    flip = gm.shape[0] > gm.shape[1]
    gt = gm.t() if flip else gm  # (short, long)
    proj, meta = state["proj"], state["proj.meta"]
    m, v = state["exp_avg"], state["exp_avg_sq"]
    every = max(every, 1)
    if (step - 1) % every == 0:
        gen = torch.Generator(device=g.device).manual_seed(proj_salt)
        old = proj.clone() if step > 1 else None
        try:
            new, _, _ = randomized_svd(gt, r, oversample=group["oversample"], power_iters=group["power_iters"],
                                       generator=gen, arena=Arena(ws, g.device))  # fmt: skip
        except LowRankFailure:
            meta[1] += 1
            new = old if old is not None else fallback_basis(gt, r, gen)
        if old is not None and new is not old:
            c = new.t() @ old  # r x r: old coordinates -> new coordinates
            c2 = c.square()
            kept = c2.sum(dim=1, keepdim=True).clamp(
                0, 1
            )  # the part of each new direction in the old span
            m.copy_(c @ m)
            v.copy_(c2 @ v + (1 - kept) * v.mean(dim=0, keepdim=True))
        proj.copy_(new)
        meta[0] += 1
    rg = proj.t() @ gt  # r x long
    m.lerp_(rg, 1 - beta1)
    v.mul_(beta2).addcmul_(rg, rg, value=1 - beta2)
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    n = (m / bc1).div_((v / bc2).sqrt_().add_(group["eps"]))
    upd = proj @ n  # short x long
    p.mul_(1 - group["lr"] * group["weight_decay"])
    p.view(gm.shape).add_(upd.t() if flip else upd, alpha=-group["lr"] * group["galore_scale"])
    return {"grad_error": outside_fraction(gt, rg), "moment_error": None}
