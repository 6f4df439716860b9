"""The state codec interface: how one optimizer state tensor lives in memory between steps.

A codec is an immutable *spec* (hashable, shared by every parameter with the same settings). The data it
describes lives in the optimizer's per-parameter state dict under keys derived from the state's name
(``exp_avg``, ``exp_avg.codes``, ...), as plain tensors, so ``state_dict()`` loads with
``torch.load(weights_only=True)``.

A step does ``x = codec.decode(state, name, param)`` (a float32 working view shaped like the parameter),
updates ``x``, then ``codec.encode(state, name, x, salt=...)`` writes it back.

A codec also describes itself, so the rest of the library needs no list of codec types (each has a default
here: a new codec implements the four storage methods above and nothing else):

- ``error_kind`` / ``error_kind_for(param)``: what kind of error storing a state makes (``ERROR_KINDS``),
  for the error decomposition (``analysis.decomposition``) and reports;
- ``describe(param)``: a short name for reports (``"4bit"``, ``"factored"``, ``"lowrank(r=8)"``, ...);
- ``for_dtensor(param)``: how the state is laid out on a DTensor (FSDP2) shard (``state.sharded``);
  default: the whole state on every rank (``sharded.Replicated``), or the local shard's state alone for
  codecs that say ``is_elementwise``;
- ``scale_block_size``, ``residual_value(...)``, ``codebook(...)``: what the probes (``analysis.probe``)
  report beside the decoded state (``None`` when a codec has no such thing).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

ERROR_KINDS = ("none", "quantization", "factorization", "lowrank")
"""What storing a state can lose: nothing, per-element precision (rounding to fewer bits: bf16, 8/4-bit
codes), everything but row/column statistics (factored), everything outside a rank-r subspace (low rank)."""

_CODEC_CLASSES: dict[str, type] = {}


def codec_class(name: str) -> type:
    """The codec class registered under ``name`` (its class name); ``ValueError`` when none is."""
    try:
        return _CODEC_CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown codec class {name!r}: import the module that defines it before loading "
                         f"(known: {sorted(_CODEC_CLASSES)})") from None  # fmt: skip


class StateCodec(ABC):
    """Storage spec of one state tensor.

    Every subclass registers itself by class name, so a checkpoint's recorded plan can rebuild it
    (``state.spec``).
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _CODEC_CLASSES[cls.__name__] = cls

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

    # ----------------------------------------------------------------------------- self-description
    @property
    def error_kind(self) -> str:
        """What kind of error this codec makes, one of ``ERROR_KINDS``.

        Default: ``"none"`` for an exact fp32 state (``is_dense_fp32``), else ``"quantization"`` (a state
        stored element by element in fewer bits). Codecs that keep a factorization or a low-rank
        approximation say ``"factorization"`` / ``"lowrank"``; wrappers say what the codec they wrap says.
        """
        return "none" if self.is_dense_fp32 else "quantization"

    def error_kind_for(self, param: torch.Tensor) -> str:
        """``error_kind`` of the state of ``param`` (its global shape): ``"none"`` where the codec keeps
        that parameter's state exactly (e.g. a low-rank codec on a vector). Default: ``error_kind``."""
        return self.error_kind

    def describe(self, param: torch.Tensor | None = None) -> str:
        """A short name for reports (``"fp32"``, ``"4bit"``, ``"factored"``, ``"lowrank(r=8)"``, ...).

        ``param`` (default None): describe what the state of this parameter really is (``"fp32"`` where
        the codec keeps it dense). Default: the class name.
        """
        return type(self).__name__

    @property
    def is_elementwise(self) -> bool:
        """Whether the state of a contiguous range of elements is stored from those elements alone
        (element-wise, or block-wise with blocks restarting at the range's start), so a DTensor shard's
        state can be kept for the shard only. Default False."""
        return False

    def for_dtensor(self, param) -> StateCodec:
        """The codec that stores this state for DTensor (FSDP2) parameter ``param`` (see ``state.sharded``).

        Default: the local shard's state alone when ``is_elementwise``, else the whole state on every rank
        (correct, but neither memory nor traffic is sharded; a one-time warning says so). Codecs with a
        sharded layout of their own override this.
        """
        from .sharded import Replicated, ShardLocal

        return ShardLocal(self) if self.is_elementwise else Replicated(self)

    @property
    def scale_block_size(self) -> int | None:
        """Elements that share one stored scale (block-wise quantization); None (default) when there are
        none. The probes measure the error per block of this size."""
        return None

    def residual_value(self, state: dict, name: str, param: torch.Tensor) -> torch.Tensor | None:
        """The error this codec tracks for state ``name`` (error feedback's residual), float32 shaped like
        ``param``; None (default) when it tracks none."""
        return None

    @property
    def kernel_kind(self) -> str | None:
        """The layout a fused kernel can read and write in place (``"quantized"``, ``"factored"``, ...; the
        keys of ``kernels.dispatch``'s table); None (default): the step decodes and encodes through the codec."""
        return None

    def kernel_operands(self, state: dict, name: str) -> tuple:
        """What a fused kernel of ``kernel_kind`` receives for state ``name``, in its argument order (the
        storage tensors, updated in place, then the codec's constants). Only for codecs with a ``kernel_kind``."""
        raise NotImplementedError(f"{type(self).__name__} has no fused-kernel layout")

    def codebook(self, state: dict, name: str) -> torch.Tensor | None:
        """The quantization levels state ``name`` uses now when they are part of the state (a learned
        codebook; a copy); None (default) otherwise."""
        return None
