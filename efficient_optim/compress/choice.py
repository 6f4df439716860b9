"""``LayerChoice``: what a controller chooses for one layer (a gradient compressor spec, a momentum spec)."""

from __future__ import annotations

from dataclasses import dataclass

from .specs import parse_compressor


@dataclass(frozen=True)
class LayerChoice:
    """What a controller chooses for one layer.

    Args:
        grad: the compressor spec of its gradient (``"q8"``, ``"q2"``, ``"top1%"``, ...; default None: unchanged).
        momentum: the spec of its momentum state (``"fp32"``, ``"bf16"``, ``"8bit"``, ``"4bit"``, ...; default
            None: unchanged).
    """

    grad: str | None = None
    momentum: str | None = None

    def __post_init__(self):
        if self.grad is not None:
            parse_compressor(self.grad)  # a clear error for a bad spec, now
        if self.momentum is not None and not isinstance(self.momentum, str):
            raise ValueError(f"momentum must be a spec string such as '8bit', got {self.momentum!r}")
