"""Static policy: the codec of each state is decided from the param group's settings and the parameter's
global size. Small tensors (biases, norms, anything under ``min_quantize_numel`` elements) stay dense fp32.
"""

from __future__ import annotations

from functools import cache

import torch

from ..state import Dense, Quantized, StateCodec

STATE_BITS = (32, 16, 8, 4)


def global_numel(param: torch.Tensor) -> int:
    """Elements of the whole parameter, not of a local shard (a DTensor reports its global size)."""
    return int(param.numel())


@cache
def codec_for(
    bits: int,
    *,
    map: str = "dynamic",
    block_size: int | None = None,
    rounding: str = "nearest",
    scale_dtype: str = "float32",
    signed: bool = True,
) -> StateCodec:
    """The (cached, shared) codec for a state stored at ``bits`` bits.

    32 -> ``Dense(float32)``; 16 -> ``Dense(bfloat16)`` (stochastic rounding if asked);
    8 / 4 -> ``Quantized`` with the given map, block size, rounding and scale dtype.
    """
    if bits == 32:
        return Dense(torch.float32)
    if bits == 16:
        return Dense(torch.bfloat16, rounding)
    return Quantized(bits, block_size, map, signed, rounding, scale_dtype)


def full_precision_codec(param: torch.Tensor | None) -> StateCodec:
    """The dense state that loses nothing: fp32, or fp64 for a float64 parameter (as ``torch.optim`` keeps it)."""
    if param is not None and param.dtype == torch.float64:
        return Dense(torch.float64)
    return codec_for(32)


def moment_codec(group: dict, prefix: str, param: torch.Tensor, *, signed: bool) -> StateCodec:
    """Codec for the state whose group settings start with ``prefix`` (``"m"`` or ``"v"``).

    Reads ``{prefix}_bits`` (falls back to ``bits``), ``{prefix}_map``, ``{prefix}_block_size``,
    ``{prefix}_rounding`` (falls back to ``rounding``), ``scale_dtype`` and ``min_quantize_numel``.
    """
    bits = group.get(f"{prefix}_bits") or group["bits"]
    if bits in (8, 4) and global_numel(param) < group["min_quantize_numel"]:
        bits = 32
    rounding = group.get(f"{prefix}_rounding") or group.get("rounding") or "nearest"
    if bits == 32:
        return full_precision_codec(param)
    if bits == 16:
        return codec_for(16, rounding=rounding)
    return codec_for(
        bits,
        map=group[f"{prefix}_map"],
        block_size=group.get(f"{prefix}_block_size"),
        rounding=rounding,
        scale_dtype=group["scale_dtype"],
        signed=signed,
    )
