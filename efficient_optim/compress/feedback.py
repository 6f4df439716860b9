"""Gradient compressors with state: one ``compress(key, tensor)`` per tensor, state kept per key.

A ``Compressor`` is stateless. Compressing gradients step after step wants state per tensor (a parameter, a
DDP bucket): the error-feedback residual, DGC's momentum, the number of calls (which seeds the random draws
so every call draws afresh and a resumed run draws what the uninterrupted one would have). A
``GradientCompressor`` keeps it, keyed by an int or a tuple of ints, and saves it with ``state_dict()``.

- ``NoFeedback(c)``: ``c`` applied as is (what is lost is lost).
- ``ErrorFeedback(c, residual=Quantize(8))``: classic error feedback (Seide et al. 2014; Karimireddy et al.
  2019) with a *compressed* residual. Each call compresses ``x = g + e`` and keeps ``e <- R(x - C(x))``,
  where ``C`` is the compressor and ``R`` the residual's compressor, so what was lost is sent later instead
  of never: over T calls the decoded payloads sum to the inputs' sum minus the last residual (exactly, for
  an exact ``R``). ``R`` adds its own rounding error, which is lost: that is the price of keeping the
  residual in 8 bits (1.06 B per element at the default block of 128) instead of 4 B.
- ``DGC`` (dgc.py): deep gradient compression, top-k with momentum correction.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..quant.rounding import mix_salt
from .base import Compressor, Payload
from .quantize import Quantize
from .specs import parse_compressor

_RESIDUAL_SALT = 0xEF


def key_parts(key) -> tuple[int, ...]:
    """A key as a tuple of ints (ints and tuples of ints are the keys a checkpoint can hold)."""
    if isinstance(key, int) and not isinstance(key, bool):
        return (key,)
    if isinstance(key, tuple) and key and all(isinstance(k, int) and not isinstance(k, bool) for k in key):
        return key
    raise ValueError(f"a compression key must be an int or a non-empty tuple of ints, got {key!r}")


def _plain_key(key):
    return key if isinstance(key, int) else list(key)


def _key_from_plain(key):
    return key if isinstance(key, int) else tuple(key)


def check_compressor(compressor, what: str = "compressor") -> Compressor:
    if not isinstance(compressor, Compressor):
        raise ValueError(f"{what} must be an efficient_optim.compress Compressor (e.g. Quantize(8)), got {compressor!r}")
    return compressor


def as_gradient_compressor(compressor) -> GradientCompressor:
    """``compressor`` itself if it keeps state, else ``NoFeedback(compressor)``."""
    if isinstance(compressor, GradientCompressor):
        return compressor
    return NoFeedback(check_compressor(compressor))


class GradientCompressor(ABC):
    """Compresses one tensor per key and keeps state per key between calls (see the module doc).

    Args:
        seed: seeds every random draw (with the key and the call count); default 0.
    """

    def __init__(self, seed: int = 0):
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.seed = seed
        self.calls: dict = {}  # key -> number of compress calls so far
        self.overrides: dict = {}  # key -> (spec, Compressor): a per-key choice (set_compressor)

    @abstractmethod
    def compressor_for(self, key) -> Compressor:
        """The compressor (payload format) of ``key``'s most recent call."""

    @abstractmethod
    def _compress(self, key, flat: torch.Tensor, salt: int) -> Payload:
        """The payload of the flat float32 ``flat``; update ``key``'s state (``salt`` seeds the draws)."""

    def compress(self, key, tensor: torch.Tensor) -> Payload:
        """The payload of ``tensor`` under ``key`` (its state is updated). NaN/Inf raise ``FloatingPointError``
        before any state changes."""
        parts = key_parts(key)
        count = self.calls.get(key, 0)
        flat = tensor.detach().reshape(-1).to(torch.float32)
        if flat.numel() and not bool(torch.isfinite(flat).all()):
            raise FloatingPointError(f"{self.describe()}: tensor of key {key!r} contains NaN or Inf; refusing to compress it")
        payload = self._compress(key, flat, mix_salt(self.seed, *parts, count))
        self.calls[key] = count + 1
        return Payload(torch.Size(tensor.shape), payload.tensors)

    def set_compressor(self, key, spec: str | None) -> None:
        """Compress ``key``'s tensors with the compressor ``spec`` names (``specs.parse_compressor``: "q4",
        "top1%", ...) from its next call on; None returns it to the default. Its state (residual) is kept.
        Change it between optimizer steps, not while an accumulation is pending."""
        key_parts(key)
        if spec is None:
            self.overrides.pop(key, None)
            return
        if not isinstance(spec, str):
            raise ValueError(f"set_compressor takes a spec string such as 'q4' (plain data for checkpoints), got {spec!r}")
        self.overrides[key] = (spec, parse_compressor(spec))

    def _chosen(self, key, default: Compressor) -> Compressor:
        chosen = self.overrides.get(key)
        return default if chosen is None else chosen[1]

    def skip(self, key) -> None:
        """Count a call of ``key`` that compresses nothing (its state is kept), so call numbers and payload
        formats stay in step with other processes that did compress."""
        key_parts(key)
        self.calls[key] = self.calls.get(key, 0) + 1

    def decompress(self, key, payload: Payload) -> torch.Tensor:
        """The float32 tensor that ``payload`` (from ``key``'s most recent call) encodes."""
        return self.compressor_for(key).decompress(payload)

    def roundtrip(self, key, tensor: torch.Tensor) -> torch.Tensor:
        """``decompress(key, compress(key, tensor))``."""
        return self.decompress(key, self.compress(key, tensor))

    def describe(self) -> str:
        return type(self).__name__

    def state_nbytes(self) -> int:
        """Bytes of the state kept between calls (residuals, momenta), over all keys."""
        return 0

    def reset(self, key=None) -> None:
        """Forget the state of ``key`` (every key when None)."""
        if key is None:
            self.calls.clear()
        else:
            self.calls.pop(key, None)

    def state_dict(self) -> dict:
        """Plain tensors and Python scalars (``torch.load(weights_only=True)`` loads it)."""
        return {"seed": self.seed, "calls": [[_plain_key(k), n] for k, n in self.calls.items()],
                "overrides": [[_plain_key(k), spec] for k, (spec, _) in self.overrides.items()]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed:
            raise ValueError(f"{self.describe()}: checkpoint seed {state.get('seed')!r} differs from this compressor's {self.seed}")
        self.calls = {_key_from_plain(k): int(n) for k, n in state["calls"]}
        self.overrides = {_key_from_plain(k): (spec, parse_compressor(spec)) for k, spec in state.get("overrides", [])}


class NoFeedback(GradientCompressor):
    """Apply ``compressor`` to each tensor with no residual (what is lost is lost).

    Args:
        compressor: the ``Compressor`` (e.g. ``Quantize(8)``, ``RandomK(0.1)``).
        seed: seeds the random draws with the key and the call count (default 0).
    """

    def __init__(self, compressor: Compressor, seed: int = 0):
        super().__init__(seed)
        self.compressor = check_compressor(compressor)

    def __repr__(self) -> str:
        return f"NoFeedback({self.compressor!r})"

    def describe(self) -> str:
        return self.compressor.describe()

    def compressor_for(self, key) -> Compressor:
        return self._chosen(key, self.compressor)

    def _compress(self, key, flat, salt):
        return self.compressor_for(key).compress(flat, salt=salt)


class ErrorFeedback(GradientCompressor):
    """Error feedback with a compressed residual (see the module doc).

    Args:
        compressor: the ``Compressor`` of the tensors (e.g. ``Quantize(4)``, ``TopK(0.01)``).
        residual: the ``Compressor`` the residual is kept in between calls (default ``Quantize(8)``;
            ``Quantize(32)`` keeps it exact, ``Quantize(16)`` in bfloat16).
        seed: seeds the random draws with the key and the call count (default 0).

    A tensor whose size differs from its key's residual (e.g. DDP rebuilt its buckets) starts with a zero
    residual; ``resets`` counts it.
    """

    def __init__(self, compressor: Compressor, residual: Compressor | None = None, seed: int = 0):
        super().__init__(seed)
        self.compressor = check_compressor(compressor)
        self.residual_compressor = check_compressor(residual, "residual") if residual is not None else Quantize(8)
        self.residuals: dict = {}  # key -> Payload of the residual
        self.resets = 0

    def __repr__(self) -> str:
        return f"ErrorFeedback({self.compressor!r}, residual={self.residual_compressor!r})"

    def describe(self) -> str:
        return f"{self.compressor.describe()}+ef({self.residual_compressor.describe()})"

    def compressor_for(self, key) -> Compressor:
        return self._chosen(key, self.compressor)

    def residual(self, key) -> torch.Tensor | None:
        """The decoded residual of ``key`` (flat float32), or None before its first call."""
        stored = self.residuals.get(key)
        return None if stored is None else self.residual_compressor.decompress(stored).reshape(-1)

    def _compress(self, key, flat, salt):
        carried = self.residual(key)
        if carried is not None and carried.numel() != flat.numel():
            carried = None
            self.resets += 1
        x = flat if carried is None else flat + carried
        comp = self.compressor_for(key)
        payload = comp.compress(x, salt=salt)
        error = x - comp.decompress(payload).reshape(-1)
        self.residuals[key] = self.residual_compressor.compress(error, salt=mix_salt(salt, _RESIDUAL_SALT))
        return payload

    def state_nbytes(self) -> int:
        return sum(p.nbytes for p in self.residuals.values())

    def reset(self, key=None) -> None:
        super().reset(key)
        if key is None:
            self.residuals.clear()
        else:
            self.residuals.pop(key, None)

    def state_dict(self) -> dict:
        out = super().state_dict()
        out["residuals"] = [[_plain_key(k), p.numel, dict(p.tensors)] for k, p in self.residuals.items()]
        out["resets"] = self.resets
        return out

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        residuals = {}
        for key, numel, tensors in state["residuals"]:
            expected = self.residual_compressor.layout(numel)
            if set(tensors) != set(expected):
                raise ValueError(f"residual of key {key!r}: tensors {sorted(tensors)} do not match the residual "
                                 f"compressor's {sorted(expected)}")  # fmt: skip
            residuals[_key_from_plain(key)] = Payload(torch.Size((numel,)), dict(tensors))
        self.residuals, self.resets = residuals, int(state.get("resets", 0))
