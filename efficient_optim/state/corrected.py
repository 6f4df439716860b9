"""Error-corrected low-bit states (protocol P5): track what quantization lost, put it back every K steps.

``ErrorCorrected(inner, residual="8bit", correct_every=K, decay=beta)`` is ``state.error_feedback.
ErrorFeedback`` — the recursion is that codec's, reused as is, and so is ``residual_value(state, name,
param)``, the tracked error that the probes compare with the true error of the stored state — with P5's
more compact residual kind, ``"4bit"`` (~0.52 extra bytes per element: block 64, dynamic map, bf16 scales,
*stochastic* rounding so the small per-step increments of the residual accumulate in expectation instead
of being flushed to zero by round-to-nearest), beside ErrorFeedback's ``"8bit"`` (~1.01 B), ``"bfloat16"``
(2 B) and ``"float32"`` (4 B).

What the residual is. For an EMA state the rule computes ``x_t = beta q_{t-1} + (1 - beta) g_t`` from the
decoded previous state, while the exact state is ``m_t = beta m_{t-1} + (1 - beta) g_t``, so the stored
state's error ``d_t = m_t - q_t`` follows ``d_t = beta d_{t-1} + (x_t - q_t)``. With ``decay = beta`` the
residual follows the same recursion between corrections (``e_t = beta e_{t-1} + (x_t - q_t)``), and a
correction stores ``q_t = Q(x_t + beta e_{t-1})`` and keeps ``e_t = x_t + beta e_{t-1} - q_t``, which is
again ``d_t``. So ``e_t = d_t`` at every step (up to the residual's own rounding; tested), and a correction
replaces the accumulated error by one rounding error.

What it can and cannot do (docs/characterization.md): between corrections the error of an EMA state
relaxes back to its stationary size within about ``1 / (1 - beta)`` steps, so correcting every ``K >>
1 / (1 - beta)`` steps (K = 100 or 1000 for m with beta1 = 0.9) removes it only briefly; K around
``1 / (1 - beta)`` or below keeps it down. Corrections cannot rescue a map whose error is not small: a zero
level in a 4-bit v map still divides by ``eps`` between corrections.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .codec import StateCodec
from .error_feedback import ErrorFeedback, _residual_codec
from .quantized import Quantized

RESIDUALS = ("4bit", "8bit", "bfloat16", "float32")


def residual_codec(kind) -> StateCodec:
    """The codec of an error residual: ``"4bit"`` here, every other kind as ``ErrorFeedback`` keeps it."""
    if kind == "4bit":
        return Quantized(4, 64, "dynamic", True, "stochastic", "bfloat16")
    if kind == "bfloat16":
        kind = torch.bfloat16
    elif kind == "float32":
        kind = torch.float32
    return _residual_codec(kind)


@dataclass(frozen=True)
class ErrorCorrected(ErrorFeedback):
    """``ErrorFeedback`` with P5's compact 4-bit residual.

    Args:
        inner: the codec that stores the state (e.g. ``Quantized(4)``, ``LearnedQuantized(4)``).
        residual: ``"8bit"`` (default), ``"4bit"``, ``"bfloat16"``, ``"float32"`` (or the dtypes).
        correct_every: K, correct every this many encodes (1 = every step, classic error feedback). Default 10.
        decay: multiplies the residual each step; the state's EMA coefficient (beta) makes the residual the
            exact accumulated error (see the module docstring). Default 1.0.
    """

    residual: object = "8bit"
    correct_every: int = 10

    def __post_init__(self):
        kind = self.residual
        if kind == "4bit":
            object.__setattr__(self, "residual", "8bit")  # let ErrorFeedback validate everything else
            try:
                super().__post_init__()
            finally:
                object.__setattr__(self, "residual", kind)
        else:
            if kind not in RESIDUALS and kind not in (torch.bfloat16, torch.float32):
                raise ValueError(f"invalid residual: {kind!r} (choose one of {list(RESIDUALS)})")
            super().__post_init__()
        object.__setattr__(self, "_res", residual_codec(kind))

    def __hash__(self):
        return hash((self.inner, str(self.residual), self.correct_every, self.decay))

    @property
    def is_dense_fp32(self) -> bool:
        return False
