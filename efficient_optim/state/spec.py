"""Codecs as plain data: what a checkpoint records of each parameter's plan, and how it is rebuilt.

``codec_to_spec(codec)`` turns a codec into a dict of plain Python values (strings, numbers, lists, dicts),
which ``torch.save`` writes and ``torch.load(weights_only=True)`` reads; ``codec_from_spec(spec)`` builds an
equal codec from it. Every codec class registers itself by its class name (``StateCodec.__init_subclass__``),
so a codec defined outside the package round-trips too, as long as its class is imported when the checkpoint
is loaded. Codecs are frozen dataclasses; their fields may be plain values, ``torch.dtype``, ``QuantMap`` or
other codecs.
"""

from __future__ import annotations

import dataclasses

import torch

from ..quant import QuantMap
from .codec import StateCodec, codec_class

_DTYPE = "__dtype__"
_QUANT_MAP = "__quant_map__"
_CODEC = "codec"


def _value_to_plain(value):
    if isinstance(value, StateCodec):
        return codec_to_spec(value)
    if isinstance(value, torch.dtype):
        return {_DTYPE: str(value).removeprefix("torch.")}
    if isinstance(value, QuantMap):
        return {_QUANT_MAP: {"name": value.name, "bits": value.bits, "signed": value.signed,
                             "levels": value.levels.tolist()}}  # fmt: skip
    if isinstance(value, (tuple, list)):
        return [_value_to_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot record a codec field of type {type(value).__name__} in a checkpoint")


def _plain_to_value(value):
    if isinstance(value, dict):
        if _CODEC in value:
            return codec_from_spec(value)
        if _DTYPE in value:
            return getattr(torch, value[_DTYPE])
        if _QUANT_MAP in value:
            q = value[_QUANT_MAP]
            return QuantMap(q["name"], q["bits"], q["signed"], torch.tensor(q["levels"], dtype=torch.float32))
    if isinstance(value, list):
        return tuple(_plain_to_value(v) for v in value)
    return value


def codec_to_spec(codec: StateCodec) -> dict:
    """``{"codec": class name, field: plain value, ...}`` of a dataclass codec (its init fields only).

    Raises ``TypeError`` naming the codec when it is not a dataclass (it cannot be described as data).
    """
    if not dataclasses.is_dataclass(codec):
        raise TypeError(f"{type(codec).__name__} is not a dataclass codec; it cannot be recorded in a checkpoint")
    spec = {_CODEC: type(codec).__name__}
    for f in dataclasses.fields(codec):
        if f.init:
            spec[f.name] = _value_to_plain(getattr(codec, f.name))
    return spec


def codec_from_spec(spec: dict) -> StateCodec:
    """The codec ``codec_to_spec`` described; ``ValueError`` naming the class when it is unknown (not imported)."""
    cls = codec_class(spec[_CODEC])
    kwargs = {k: _plain_to_value(v) for k, v in spec.items() if k != _CODEC}
    return cls(**kwargs)
