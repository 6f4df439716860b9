"""The state codec interface: how one optimizer state tensor lives in memory between steps.

A codec is an immutable *spec* (hashable, shared by every parameter with the same settings). The data it
describes lives in the optimizer's per-parameter state dict under keys derived from the state's name
(``exp_avg``, ``exp_avg.codes``, ...), as plain tensors, so ``state_dict()`` loads with
``torch.load(weights_only=True)``.

A step does ``x = codec.decode(state, name, param)`` (a float32 working view shaped like the parameter),
updates ``x``, then ``codec.encode(state, name, x, salt=...)`` writes it back.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class StateCodec(ABC):
    """Storage spec of one state tensor."""

    @abstractmethod
    def init(self, state: dict, name: str, param: torch.Tensor) -> None:
        """Create the zero-valued storage for state ``name`` of ``param`` in ``state``."""

    @abstractmethod
    def decode(self, state: dict, name: str, param: torch.Tensor) -> torch.Tensor:
        """The state as a float32 tensor shaped like ``param`` (may alias the storage for dense fp32)."""

    @abstractmethod
    def encode(self, state: dict, name: str, value: torch.Tensor, *, salt: int = 0) -> None:
        """Store ``value`` (float32, param-shaped) into the existing storage, in place.

        ``salt`` seeds stochastic rounding (see ``quant.rounding``); ignored by exact codecs.
        """

    @abstractmethod
    def expected(self, name: str, param: torch.Tensor) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Key -> (shape, dtype) of every tensor this codec keeps for ``param``; used to validate loads."""

    def keys(self, name: str, param: torch.Tensor) -> list[str]:
        return list(self.expected(name, param))

    def nbytes(self, state: dict, name: str) -> int:
        """Exact bytes held in ``state`` for ``name``."""
        total = 0
        for key, t in state.items():
            if key == name or key.startswith(name + "."):
                total += t.numel() * t.element_size()
        return total

    def shared_tensors(self) -> dict[str, torch.Tensor]:
        """Tables shared by every parameter using this codec (counted once in memory figures)."""
        return {}

    @property
    def is_dense_fp32(self) -> bool:
        return False
