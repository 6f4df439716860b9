"""What every gradient compressor shares: the payload it produces, its exact byte layout, the wire format.

A ``Compressor`` turns a tensor into a ``Payload`` (a few plain tensors) and back:

    payload = compressor.compress(grad, salt=step)     # what is stored or sent
    approx = compressor.decompress(payload)            # float32, shaped like grad
    compressor.nbytes(grad.numel()) == payload.nbytes  # exact, known before compressing

``layout(numel)`` names every tensor of the payload with its shape and dtype; it depends only on the number of
elements, so a payload's size is fixed in advance (a buffer can be sized, a collective can exchange payloads
of equal length) and ``to_wire`` / ``from_wire`` flatten a payload into one ``uint8`` tensor and back.

Compressors hold no per-tensor state: error feedback (``feedback.ErrorFeedback``) and DGC's momentum
correction (``dgc.DGC``) keep theirs, keyed per tensor, around a compressor.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]


@dataclass
class Payload:
    """The compressed form of one tensor.

    Args:
        shape: the original tensor's shape (decompression restores it).
        tensors: name -> plain tensor, in the compressor's ``layout`` order.
    """

    shape: torch.Size
    tensors: dict[str, torch.Tensor]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes the payload really holds (sum over its tensors)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def sub(self, prefix: str, shape) -> Payload:
        """The inner payload stored under ``prefix.`` (a compressor composed of another one)."""
        cut = len(prefix) + 1
        return Payload(torch.Size(shape), {k[cut:]: v for k, v in self.tensors.items() if k.startswith(prefix + ".")})


def prefixed(prefix: str, payload: Payload) -> dict[str, torch.Tensor]:
    """``payload``'s tensors under ``prefix.name`` (to nest one compressor's payload in another's)."""
    return {f"{prefix}.{k}": v for k, v in payload.tensors.items()}


def layout_nbytes(layout: Layout) -> int:
    return sum(math.prod(shape) * torch.empty(0, dtype=dtype).element_size() for shape, dtype in layout.values())


class Compressor(ABC):
    """A stateless lossy (or exact) transform of one tensor into a ``Payload``; see the module doc.

    Subclasses implement ``layout``, ``_compress`` (flat float32 input) and ``_decompress`` (flat float32
    output of ``numel`` elements). Non-finite input raises ``FloatingPointError``: it is never encoded.
    """

    @abstractmethod
    def layout(self, numel: int) -> Layout:
        """Name -> (shape, dtype) of every tensor of the payload of a tensor of ``numel`` elements."""

    @abstractmethod
    def _compress(self, flat: torch.Tensor, salt: int) -> dict[str, torch.Tensor]:
        """The payload's tensors for the flat float32 tensor ``flat``."""

    @abstractmethod
    def _decompress(self, tensors: dict[str, torch.Tensor], numel: int) -> torch.Tensor:
        """The flat float32 tensor of ``numel`` elements that ``tensors`` encode."""

    def describe(self) -> str:
        """A short human-readable name, e.g. ``q8`` or ``top1%``."""
        return type(self).__name__

    def nbytes(self, numel: int) -> int:
        """Exact payload bytes for a tensor of ``numel`` elements."""
        return layout_nbytes(self.layout(numel))

    def bits_per_element(self, numel: int) -> float:
        """Payload bits per element of a tensor of ``numel`` elements (index and scale overheads included)."""
        return 8.0 * self.nbytes(numel) / max(1, numel)

    def compress(self, tensor: torch.Tensor, *, salt: int = 0) -> Payload:
        """The payload of ``tensor`` (any float dtype and shape).

        Args:
            tensor: the tensor to compress; NaN/Inf raise ``FloatingPointError``.
            salt: 32-bit seed of the random draws (stochastic rounding, random selection); default 0.
        """
        if not torch.is_floating_point(tensor):
            raise TypeError(f"{self.describe()}: expects a floating-point tensor, got {tensor.dtype}")
        flat = tensor.detach().reshape(-1).to(torch.float32)
        if flat.numel() and not bool(torch.isfinite(flat).all()):
            raise FloatingPointError(f"{self.describe()}: input contains NaN or Inf; refusing to compress it")
        return Payload(torch.Size(tensor.shape), self._compress(flat, salt))

    def decompress(self, payload: Payload) -> torch.Tensor:
        """The float32 tensor (the original shape) that ``payload`` encodes."""
        return self._decompress(payload.tensors, payload.numel).view(payload.shape)

    def roundtrip(self, tensor: torch.Tensor, *, salt: int = 0) -> torch.Tensor:
        """``decompress(compress(tensor))``: what the receiver of ``tensor`` sees."""
        return self.decompress(self.compress(tensor, salt=salt))

    def to_wire(self, payload: Payload) -> torch.Tensor:
        """The payload as one flat ``uint8`` tensor of ``nbytes(numel)`` bytes (layout order)."""
        parts = []
        for name, (shape, dtype) in self.layout(payload.numel).items():
            t = payload.tensors[name]
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"payload tensor {name!r} is {tuple(t.shape)} {t.dtype}, layout says {shape} {dtype}")
            parts.append(t.contiguous().view(-1).view(torch.uint8))
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)

    def from_wire(self, wire: torch.Tensor, shape) -> Payload:
        """Inverse of ``to_wire`` for a tensor of ``shape``."""
        shape = torch.Size(shape)
        numel = math.prod(shape)
        expected = self.nbytes(numel)
        if wire.dtype != torch.uint8 or wire.numel() != expected:
            raise ValueError(f"wire buffer must be {expected} uint8 bytes for {numel} elements, got {wire.numel()} {wire.dtype}")
        tensors, at = {}, 0
        for name, (tshape, dtype) in self.layout(numel).items():
            itemsize = torch.empty(0, dtype=dtype).element_size()
            part = wire[at:at + math.prod(tshape) * itemsize]
            if part.storage_offset() % itemsize:  # after an odd number of code bytes: copy to align
                part = part.clone()
            tensors[name] = part.view(dtype).view(tshape)
            at += part.numel()
        return Payload(shape, tensors)


def check_fraction(fraction, what: str = "fraction") -> float:
    """``fraction`` as a float in (0, 1]; ``ValueError`` naming ``what`` otherwise."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"{what} must be a number in (0, 1], got {fraction!r}")
    return float(fraction)


def kept_count(numel: int, fraction: float) -> int:
    """Entries kept of ``numel`` at ``fraction``: ``ceil(fraction * numel)``, at least 1 (0 for an empty tensor)."""
    return 0 if numel == 0 else max(1, min(numel, math.ceil(fraction * numel - 1e-9)))
