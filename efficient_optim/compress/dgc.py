"""Deep gradient compression (Lin et al., ICLR 2018), the sparsification baseline.

Per tensor (key), each call with gradient ``g``:

1. *local clipping*: ``g <- g * min(1, clip_norm / ||g||)`` (the paper clips each worker's whole gradient at
   the global threshold x N^-1/2; a communication hook sees one bucket at a time, so here the norm is the
   tensor's: pass ``clip_norm`` already scaled for your number of workers and buckets);
2. *momentum correction*: ``u <- momentum * u + g``, ``v <- v + u`` (the momentum is accumulated locally,
   so the optimizer that receives the result must be plain SGD without momentum);
3. the top-k entries of ``v`` are sent (``TopK``: DGC's sampled threshold), and *momentum factor masking*
   zeroes them in both ``u`` and ``v``; the rest stays in ``v`` to be sent later;
4. *warm-up*: during the first ``warmup_calls`` calls of a key the kept fraction falls exponentially, in four
   equal stages, 25 % -> 6.25 % -> 1.56 % -> 0.39 % (the paper's 75 % ... 99.6 % sparsity), never below
   ``fraction``; then ``fraction``.

State per element: ``u`` and ``v`` in float32 (8 B), twice an fp32 error-feedback residual. DGC buys bytes
on the wire with memory; the payload is ``k`` int32 indices + ``k`` values.
"""

from __future__ import annotations

import math

import torch

from .base import Compressor, Payload, check_fraction
from .feedback import GradientCompressor, _key_from_plain, _plain_key
from .sparsify import TopK

WARMUP_STAGES = (0.25, 0.0625, 0.015625, 0.00390625)


class DGC(GradientCompressor):
    """Deep gradient compression with momentum correction, local clipping and warm-up (see the module doc).

    Args:
        fraction: the kept fraction after warm-up, in (0, 1] (default 0.001, the paper's 99.9 % sparsity).
        momentum: the momentum factor of the correction (default 0.9; 0 gives plain top-k with accumulation).
        clip_norm: the local clipping threshold on each tensor's L2 norm (default None: no clipping).
        warmup_calls: calls per key over which the kept fraction falls in four stages (default 0: none).
        values: how the kept values are stored (a ``Compressor``; default float32).
        sample_fraction: the fraction of entries sampled for the top-k threshold (default 0.01).
        seed: seeds the threshold's samples with the key and call count (default 0).
    """

    def __init__(self, fraction: float = 0.001, momentum: float = 0.9, clip_norm: float | None = None,
                 warmup_calls: int = 0, values: Compressor | None = None, sample_fraction: float = 0.01,
                 seed: int = 0):  # fmt: skip
        super().__init__(seed)
        self.fraction = check_fraction(fraction)
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
        if clip_norm is not None and (isinstance(clip_norm, bool) or not isinstance(clip_norm, (int, float)) or clip_norm <= 0):
            raise ValueError(f"clip_norm must be None or a number > 0, got {clip_norm!r}")
        if isinstance(warmup_calls, bool) or not isinstance(warmup_calls, int) or warmup_calls < 0:
            raise ValueError(f"warmup_calls must be an integer >= 0, got {warmup_calls!r}")
        self.momentum, self.clip_norm, self.warmup_calls = float(momentum), clip_norm, warmup_calls
        self.values, self.sample_fraction = values, sample_fraction
        self._topk: dict[float, TopK] = {}
        self.velocity: dict = {}  # key -> u (flat float32)
        self.accumulated: dict = {}  # key -> v (flat float32)

    def __repr__(self) -> str:
        return f"DGC(fraction={self.fraction}, momentum={self.momentum}, clip_norm={self.clip_norm}, warmup_calls={self.warmup_calls})"

    def describe(self) -> str:
        return f"dgc{100 * self.fraction:g}%"

    def fraction_at(self, call: int) -> float:
        """The kept fraction at a key's call number ``call`` (0-based): the warm-up stages, then ``fraction``."""
        if call < self.warmup_calls:
            stage = min(len(WARMUP_STAGES) - 1, math.floor(len(WARMUP_STAGES) * call / self.warmup_calls))
            return max(self.fraction, WARMUP_STAGES[stage])
        return self.fraction

    def set_compressor(self, key, spec) -> None:
        raise ValueError("DGC's kept fraction follows its warm-up and `fraction`; per-key compressors are for "
                         "NoFeedback and ErrorFeedback")  # fmt: skip

    def _topk_for(self, fraction: float) -> TopK:
        if fraction not in self._topk:
            self._topk[fraction] = TopK(fraction, values=self.values, sample_fraction=self.sample_fraction)
        return self._topk[fraction]

    def compressor_for(self, key) -> Compressor:
        return self._topk_for(self.fraction_at(max(0, self.calls.get(key, 1) - 1)))

    def _compress(self, key, flat, salt) -> Payload:
        if self.clip_norm is not None:
            norm = float(flat.norm())
            if norm > self.clip_norm:
                flat = flat * (self.clip_norm / norm)
        u, v = self.velocity.get(key), self.accumulated.get(key)
        if u is None or u.numel() != flat.numel():
            u, v = torch.zeros_like(flat), torch.zeros_like(flat)
        u.mul_(self.momentum).add_(flat)
        v.add_(u)
        topk = self._topk_for(self.fraction_at(self.calls.get(key, 0)))
        payload = topk.compress(v, salt=salt)
        idx = payload.tensors["indices"].to(torch.int64)
        v[idx] = 0.0
        u[idx] = 0.0
        self.velocity[key], self.accumulated[key] = u, v
        return payload

    def state_nbytes(self) -> int:
        tensors = [*self.velocity.values(), *self.accumulated.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def reset(self, key=None) -> None:
        super().reset(key)
        for store in (self.velocity, self.accumulated):
            if key is None:
                store.clear()
            else:
                store.pop(key, None)

    def state_dict(self) -> dict:
        out = super().state_dict()
        out["momenta"] = [[_plain_key(k), u, self.accumulated[k]] for k, u in self.velocity.items()]
        return out

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.velocity = {_key_from_plain(k): u.clone() for k, u, _ in state["momenta"]}
        self.accumulated = {_key_from_plain(k): v.clone() for k, _, v in state["momenta"]}
