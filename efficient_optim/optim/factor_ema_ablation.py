"""The factor-EMA sketch, kept as an ablation for the low-rank study (docs/lowrank_adam.md): factor each gradient
``g ~ a b^T`` (rank r, randomized SVD, signs aligned), keep ``A = EMA(a)``, ``B = EMA(b)`` and use ``A B^T`` as the
first moment. ``EMA(a) EMA(b)^T`` mixes factors of different steps and weights step t by ``w_t^2``, not ``w_t``:
it is not a compressed EMA of the gradients (tests/test_lowrank.py demonstrates it). Reached through
``LowRankAdam(update_strategy="factor_ema")``; not a codec (its state is updated from gradient factors, never
encoded).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..state import StateCodec
from ..state.lowrank import Arena, LowRankFailure, matrix_shape, randomized_svd
from .lowrank_support import encode_state, outside_fraction


@dataclass(frozen=True)
class FactorEMA(StateCodec):
    """The plan's sketch: EMAs ``A`` (m x r) and ``B`` (n x r) of the factors of each gradient."""

    rank: int

    @property
    def error_kind(self) -> str:
        return "lowrank"

    def expected(self, name, param):
        m, n = matrix_shape(param)
        return {f"{name}.a": ((m, self.rank), torch.float32), f"{name}.b": ((n, self.rank), torch.float32),
                f"{name}.meta": ((2,), torch.int64)}  # fmt: skip

    def init(self, state, name, param):
        for key, (shape, dtype) in self.expected(name, param).items():
            state[key] = torch.zeros(shape, dtype=dtype, device=param.device)

    def decode(self, state, name, param):
        return (state[f"{name}.a"] @ state[f"{name}.b"].t()).view(param.shape)

    def encode(self, state, name, value, *, salt=0):
        raise NotImplementedError("FactorEMA is updated from gradient factors by factor_ema_step, not encoded")



def factor_ema_step(group: dict, p, g, state: dict, codecs: dict, step: int, ws, *, m_salt: int, v_salt: int) -> dict:
    """The plan's sketch (ablation): EMAs of the factors of each gradient, their product as the moment."""
    beta1, beta2 = group["betas"]
    r = group["rank"]
    a, b, meta = state["exp_avg.a"], state["exp_avg.b"], state["exp_avg.meta"]
    gm = g.reshape(a.shape[0], -1)
    gen = torch.Generator(device=g.device).manual_seed(m_salt)
    grad_error = None
    try:
        u, s, w = randomized_svd(gm, r, oversample=group["oversample"], power_iters=group["power_iters"],
                                 generator=gen, arena=Arena(ws, g.device))  # fmt: skip
        root = s.clamp_min(0).sqrt()
        fa, fb = u * root, w * root
        sign = torch.where((fa * a).sum(0) < 0, -1.0, 1.0)  # u_i w_i^T is unchanged by a joint sign flip
        a.lerp_(fa * sign, 1 - beta1)
        b.lerp_(fb * sign, 1 - beta1)
        grad_error = outside_fraction(gm, s)
    except LowRankFailure:
        meta[1] += 1  # keep the factor EMAs as they are
    meta[0] += 1
    vc = codecs["exp_avg_sq"]
    v = vc.decode(state, "exp_avg_sq", p)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bc1, bc2 = (1 - beta1**step) ** 2, 1 - beta2**step  # each factor EMA carries (1 - beta1^t)
    mhat = (a @ b.t()).view(p.shape).div_(bc1)
    p.mul_(1 - group["lr"] * group["weight_decay"])
    p.addcdiv_(mhat, (v / bc2).sqrt_().add_(group["eps"]), value=-group["lr"])
    encode_state(vc, state, "exp_avg_sq", v, v_salt, ws)
    return {"grad_error": grad_error, "moment_error": None}
