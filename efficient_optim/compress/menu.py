"""The action space every controller kind chooses from: per layer, gradient bits, kept fraction, momentum spec.

A menu choice is three indices ``(bits_i, keep_i, momentum_i)`` into

- ``GRAD_BITS = (2, 4, 8, 16, 32)``: bits per kept gradient value (block-wise quantization below 16; ``bf16``
  at 16; ``fp32`` at 32; ``quantize.Quantize``);
- ``KEEP_FRACTIONS = (0.01, 0.1, 1.0)``: the fraction of gradient entries kept (top-k; 1.0 = dense);
- ``MOMENTUM_SPECS = ("4bit", "8bit", "bf16", "fp32")``: how the momentum state is stored (the optimizer's
  state specs, ``policy.specs``), cheapest to most precise.

Each tuple is ordered cheapest to most precise. Bytes rise with the index along every dimension except one:
top-k stores an int32 index per kept value, so keeping 10 % costs more than the dense gradient at 2 bits
(the 1 % fraction is always the cheapest). Whatever needs a byte order (the budget's projection)
sorts the options by their exact bytes instead of trusting the indices.
``grad_spec(bits, keep)`` names the gradient compressor (``specs.parse_compressor`` builds it), and
``choice_from_indices`` turns indices (e.g. a policy network's three heads) into a ``LayerChoice``;
``indices_of`` is its inverse for a choice on the menu (e.g. to clone a planner's choices).

    grad_spec(8, 1.0) == "q8"; grad_spec(16, 1.0) == "bf16"; grad_spec(32, 1.0) == "fp32"
    grad_spec(4, 0.1) == "top10%/q4"; grad_spec(32, 0.01) == "top1%" (fp32 values)
"""

from __future__ import annotations

from .choice import LayerChoice

GRAD_BITS = (2, 4, 8, 16, 32)
KEEP_FRACTIONS = (0.01, 0.1, 1.0)
MOMENTUM_SPECS = ("4bit", "8bit", "bf16", "fp32")
DENSE_SPECS = {2: "q2", 4: "q4", 8: "q8", 16: "bf16", 32: "fp32"}


def grad_spec(bits: int, keep: float) -> str:
    """The compressor spec of a gradient at ``bits`` bits per kept value with ``keep`` of its entries kept.

    Args:
        bits: one of ``GRAD_BITS``.
        keep: one of ``KEEP_FRACTIONS`` (1.0: dense, quantized; below 1: top-k with quantized values).
    """
    if bits not in DENSE_SPECS:
        raise ValueError(f"gradient bits must be one of {GRAD_BITS}, got {bits!r}")
    if keep not in KEEP_FRACTIONS:
        raise ValueError(f"kept fraction must be one of {KEEP_FRACTIONS}, got {keep!r}")
    if keep == 1.0:
        return DENSE_SPECS[bits]
    values = "" if bits == 32 else f"/{DENSE_SPECS[bits]}"
    return f"top{100 * keep:g}%{values}"


GRAD_SPECS = tuple(grad_spec(b, k) for k in KEEP_FRACTIONS for b in GRAD_BITS)  # every gradient spec on the menu
_GRAD_INDICES = {grad_spec(b, k): (i, j) for j, k in enumerate(KEEP_FRACTIONS) for i, b in enumerate(GRAD_BITS)}


def _index(value, size: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < size:
        raise ValueError(f"{what} must be an integer in [0, {size - 1}], got {value!r}")
    return value


def choice_from_indices(bits_i: int, keep_i: int, momentum_i: int) -> LayerChoice:
    """The ``LayerChoice`` of menu indices: ``GRAD_BITS[bits_i]``, ``KEEP_FRACTIONS[keep_i]``,
    ``MOMENTUM_SPECS[momentum_i]`` (a ``ValueError`` names an index out of range)."""
    bits = GRAD_BITS[_index(bits_i, len(GRAD_BITS), "bits_i")]
    keep = KEEP_FRACTIONS[_index(keep_i, len(KEEP_FRACTIONS), "keep_i")]
    momentum = MOMENTUM_SPECS[_index(momentum_i, len(MOMENTUM_SPECS), "momentum_i")]
    return LayerChoice(grad_spec(bits, keep), momentum)


def indices_of(choice: LayerChoice) -> tuple[int, int, int]:
    """``(bits_i, keep_i, momentum_i)`` of a choice on the menu (inverse of ``choice_from_indices``); a
    ``ValueError`` when its gradient or momentum spec is not on the menu (or not set)."""
    if choice.grad not in _GRAD_INDICES:
        raise ValueError(f"gradient spec {choice.grad!r} is not on the menu ({list(GRAD_SPECS)})")
    if choice.momentum not in MOMENTUM_SPECS:
        raise ValueError(f"momentum spec {choice.momentum!r} is not on the menu ({list(MOMENTUM_SPECS)})")
    return (*_GRAD_INDICES[choice.grad], MOMENTUM_SPECS.index(choice.momentum))
