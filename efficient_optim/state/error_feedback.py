"""Error feedback for any lossy codec: keep what the last encode lost and add it back before the next one.

``ErrorFeedback(inner, residual=torch.bfloat16)`` stores the state through ``inner`` and, beside it, the
residual ``e = target - decode(encode(target))`` under ``name.residual`` (dense bf16/fp32, or 8-bit
block-quantized). Each encode stores ``target = value + decay * e`` instead of ``value`` (every
``correct_every``-th encode; in between, ``e <- decay * e + (value - decode(encode(value)))`` only tracks
the error). ``decode`` returns the inner codec's value: the residual is not part of the state the rule
sees, it keeps the error from *accumulating*.

Why it helps an EMA state (``m_t = beta m_{t-1} + (1 - beta) g_t``, the rule computes
``value_t = beta q_{t-1} + (1 - beta) g_t`` from the decoded ``q_{t-1}``). Let ``d_t = m_t - q_t`` be the
error of the stored state. Without feedback, ``d_t = beta d_{t-1} + eps_t`` with ``eps_t`` the fresh
quantization error: independent errors pile up to ``Var(d) = Var(eps) / (1 - beta^2)`` (5.3x the one-step
error variance at beta = 0.9, 500x at 0.999). With feedback and ``decay = beta``, ``q_t = value_t +
beta e_{t-1} - e_t`` gives ``d_t = beta (d_{t-1} - e_{t-1}) + e_t``, so ``d_t = e_t`` by induction: the
stored state is always exactly one quantization error away from the true EMA. With ``decay = 1``
(classic error feedback, as for sums) ``d_t - e_t = beta (d_{t-1} - e_{t-1}) - (1 - beta) e_{t-1}``:
``Var(d) ~ (1 + (1 - beta) / (1 + beta)) Var(e)``, nearly as good. Both are tested
(tests/test_lowrank.py). A compact residual adds its own rounding error to ``e``.

Memory per element of the state, on top of the inner codec's: fp32 residual 4 B, bf16 2 B, 8-bit
~1.02 B (block 256, bf16 scales). So 4-bit + bf16 residual (2.5 B) costs more than a plain bf16 state
(2 B), and 4-bit + 8-bit residual (1.5 B) about as much as 8-bit + bf16 scales (1.02 B) plus half a byte:
feedback pays where the inner codec's error is the problem and the residual is kept compact, and never
on a low-rank inner codec (the residual is full size; it would undo the saving).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..quant.rounding import mix_salt
from .codec import StateCodec
from .dense import Dense
from .quantized import Quantized

RESIDUAL_KINDS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "8bit": "8bit"}
_RESIDUAL_SALT = 0xEF


def _residual_codec(kind) -> StateCodec:
    if kind in (torch.float32, "float32", "fp32"):
        return Dense(torch.float32)
    if kind in (torch.bfloat16, "bfloat16", "bf16"):
        return Dense(torch.bfloat16)
    if kind in ("8bit", 8):
        return Quantized(8, None, "dynamic", True, "nearest", "bfloat16")
    raise ValueError(f"invalid residual: {kind!r} (torch.float32, torch.bfloat16 or '8bit')")


@dataclass(frozen=True)
class ErrorFeedback(StateCodec):
    """Wrap a lossy codec with an error-feedback residual.

    Args:
        inner: the codec that stores the state (e.g. ``Quantized(4)``).
        residual: how the residual is kept: ``torch.bfloat16`` (default), ``torch.float32`` or ``"8bit"``.
        correct_every: add the residual back every this many encodes (default 1: every encode).
        decay: the residual is multiplied by this before it is added back / carried (default 1.0, classic
            error feedback; the EMA's beta makes the residual the exact error of an EMA state).
    """

    inner: StateCodec
    residual: object = torch.bfloat16
    correct_every: int = 1
    decay: float = 1.0
    _res: StateCodec = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self):
        if not isinstance(self.inner, StateCodec):
            raise ValueError(f"invalid inner: {self.inner!r} (must be a StateCodec)")
        object.__setattr__(self, "_res", _residual_codec(self.residual))
        if (
            not isinstance(self.correct_every, int)
            or isinstance(self.correct_every, bool)
            or self.correct_every < 1
        ):
            raise ValueError(f"invalid correct_every: {self.correct_every!r} (must be an integer >= 1)")
        if (
            isinstance(self.decay, bool)
            or not isinstance(self.decay, (int, float))
            or not 0 <= self.decay <= 1
        ):
            raise ValueError(f"invalid decay: {self.decay!r} (must be in [0, 1])")

    def __hash__(self):
        return hash((self.inner, str(self.residual), self.correct_every, self.decay))

    @staticmethod
    def residual_name(name: str) -> str:
        return f"{name}.residual"

    def expected(self, name, param):
        out = dict(self.inner.expected(name, param))
        out.update(self._res.expected(self.residual_name(name), param))
        if self.correct_every > 1:
            out[f"{name}.ef_count"] = ((), torch.int64)
        return out

    def init(self, state, name, param):
        self.inner.init(state, name, param)
        self._res.init(state, self.residual_name(name), param)
        if self.correct_every > 1:
            state[f"{name}.ef_count"] = torch.zeros((), dtype=torch.int64, device=param.device)

    def decode(self, state, name, param):
        return self.inner.decode(state, name, param)

    def encode(self, state, name, value, *, salt=0, **kw):
        rname = self.residual_name(name)
        e = self._res.decode(state, rname, value)
        if self.correct_every > 1:
            count = state[f"{name}.ef_count"]
            correct = int(count) % self.correct_every == 0
            count += 1
        else:
            correct = True
        value = value.float()
        target = value + self.decay * e if correct else value
        self.inner.encode(state, name, target, salt=salt, **kw)
        stored = self.inner.decode(state, name, value)
        new_e = target - stored if correct else self.decay * e + (value - stored)
        self._res.encode(state, rname, new_e, salt=mix_salt(salt, _RESIDUAL_SALT))

    def shared_tensors(self):
        return {**self.inner.shared_tensors(), **self._res.shared_tensors()}

    # ------------------------------------------------- self-description: that of the codec it wraps
    @property
    def error_kind(self) -> str:
        return self.inner.error_kind

    def error_kind_for(self, param) -> str:
        return self.inner.error_kind_for(param)

    def describe(self, param=None) -> str:
        """The wrapped codec's name with this wrapper's, e.g. ``"4bit (ErrorFeedback)"``."""
        return f"{self.inner.describe(param)} ({type(self).__name__})"

    @property
    def is_elementwise(self) -> bool:
        return self.inner.is_elementwise  # the residual (dense or 8-bit) is element-wise itself

    @property
    def scale_block_size(self) -> int | None:
        return self.inner.scale_block_size

    def residual_value(self, state, name, param):
        """The tracked error ``e`` of state ``name`` (float32, shaped like ``param``)."""
        return self._res.decode(state, self.residual_name(name), param).to(torch.float32)

    def codebook(self, state, name):
        return self.inner.codebook(state, name)
