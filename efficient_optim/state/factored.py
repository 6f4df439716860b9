"""Factored storage of a non-negative second moment (Adafactor's row/column statistics).

For a tensor of shape ``(..., R, C)`` the codec keeps ``name.row`` (shape ``(..., R)``: the mean of each
row) and ``name.col`` (shape ``(..., C)``: the mean of each column), ``R + C`` numbers instead of ``R * C``.
It stands for the rank-1 non-negative matrix

    V_hat = outer(row, col) / mean(row)

whose row means are exactly ``row`` and column means exactly ``col`` (Shazeer & Stern 2018, with means in
place of sums: the same matrix, better-scaled numbers). ``encode(V)`` keeps V's row and column means.

Why a generic rule gives Adafactor's exact update: row and column means are linear in V, and V_hat's own
means are ``(row, col)``, so encoding ``beta * decode() + (1 - beta) * g**2`` stores
``beta * row + (1 - beta) * rowmean(g**2)`` (and the same for columns) — precisely the exponential moving
averages of Adafactor's statistics. AdamW's rule with this codec for ``v`` is AdamW with a factored second
moment; no special code path is needed. Tensors with fewer than 2 dimensions are kept dense (fp32).

(``V_hat``'s row means are ``row * mean(col) / mean(row)``, which is ``row`` because both vectors are means
of the same matrices, so ``mean(row) == mean(col)``; a rounding difference between the two does not
accumulate: every encode sets both to the means of one matrix again.)

``encode`` of an arbitrary dense value is a projection (it keeps only the row and column means); the
rules decide what they divide by: AdamW (``HybridAdam``) uses the dense ``beta2 * V_hat + (1 - beta2) g^2``
of the step, whose ``g^2`` part is exact; Adafactor divides by the factored estimate of the new moment
(``project_``), as the paper and ``transformers`` do. Adding Adafactor's ``eps1`` to ``g^2`` is the rule's
job; the codec's ``eps`` only floors ``mean(row)`` in the reconstruction, so an all-zero moment decodes to
zero instead of NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .codec import StateCodec

TINY = 1e-30  # default floor of mean(row) when reconstructing (an all-zero moment stays zero)


def _reconstruct(row: torch.Tensor, col: torch.Tensor, eps: float) -> torch.Tensor:
    # out of place: on a row-sharded DTensor the mean is a pending partial sum, which an in-place op cannot complete
    scale = row.mean(dim=-1, keepdim=True).clamp_min(eps)
    return (row / scale).unsqueeze(-1) * col.unsqueeze(-2)


@dataclass(frozen=True)
class Factored(StateCodec):
    """Row/column-mean storage of a non-negative state of a >= 2-D tensor (dense fp32 below 2-D).

    Args:
        eps: floor of ``mean(row)`` in the reconstruction ``outer(row, col) / mean(row)`` (default 1e-30,
            Adafactor's eps1); must be > 0.
    """

    eps: float = TINY

    def __post_init__(self):
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not 0 < self.eps < float("inf"):
            raise ValueError(f"invalid eps: {self.eps!r} (must be a finite number > 0)")

    @staticmethod
    def factors(param: torch.Tensor) -> bool:
        return param.dim() >= 2

    @property
    def error_kind(self) -> str:
        return "factorization"

    def error_kind_for(self, param) -> str:
        """``"factorization"`` for >= 2-D parameters, ``"none"`` below (a dense fp32 state)."""
        return "factorization" if self.factors(param) else "none"

    def describe(self, param=None) -> str:
        """``"factored"`` (``"fp32"`` for a parameter below 2-D, whose state is dense)."""
        return "fp32" if param is not None and not self.factors(param) else "factored"

    def for_dtensor(self, param):
        """Row/column statistics as DTensors (``sharded.ShardedFactored``): sharded along the parameter's
        sharded dims, replicated across them; the whole state on every rank for other placements."""
        from .dtensor_shards import reduced_placements
        from .sharded import ShardedFactored

        rows = reduced_placements(param, -1)
        cols = reduced_placements(param, -2) if param.dim() >= 2 else None
        if not self.factors(param) or (rows is not None and cols is not None):
            return ShardedFactored(self, rows, cols)
        return super().for_dtensor(param)

    @staticmethod
    def project_(value: torch.Tensor, eps: float = TINY) -> torch.Tensor:
        """Replace a dense value by what this codec stores of it (its rank-1 reconstruction), in place.

        Adafactor's update divides by the factored estimate of the *new* moment; a rule that wants
        exactly that projects before using the value (AdamW-style rules may use the dense value).
        """
        if value.dim() >= 2:
            value.copy_(_reconstruct(value.mean(dim=-1), value.mean(dim=-2), eps))
        return value

    @property
    def kernel_kind(self) -> str:
        return "factored"

    def kernel_operands(self, state, name) -> tuple:
        """``(row means, column means, eps)`` of a factored (matrix) state, in the fused kernel's order."""
        return state[f"{name}.row"], state[f"{name}.col"], self.eps

    def init(self, state, name, param):
        if not self.factors(param):
            state[name] = torch.zeros_like(param, dtype=torch.float32, memory_format=torch.contiguous_format)
            return
        state[f"{name}.row"] = torch.zeros(param.shape[:-1], dtype=torch.float32, device=param.device)
        state[f"{name}.col"] = torch.zeros(param.shape[:-2] + param.shape[-1:], dtype=torch.float32, device=param.device)

    def decode(self, state, name, param):
        if not self.factors(param):
            return state[name]
        return _reconstruct(state[f"{name}.row"], state[f"{name}.col"], self.eps)

    def encode(self, state, name, value, *, salt=0):
        if name in state:
            if state[name].data_ptr() != value.data_ptr():
                state[name].copy_(value)
            return
        state[f"{name}.row"].copy_(value.mean(dim=-1))
        state[f"{name}.col"].copy_(value.mean(dim=-2))

    def expected(self, name, param):
        if not self.factors(param):
            return {name: (tuple(param.shape), torch.float32)}
        shape = tuple(param.shape)
        return {f"{name}.row": (shape[:-1], torch.float32), f"{name}.col": (shape[:-2] + shape[-1:], torch.float32)}
