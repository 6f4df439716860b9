"""Compressor specs: short strings that name a compressor, so choices are plain data (checkpoints, logs).

    "fp32" | "bf16" | "q8" | "q4" | "q2"          Quantize(32 | 16 | 8 | 4 | 2) with its defaults
    "top<P>%"  e.g. "top10%", "top0.1%"             TopK(P / 100), float32 values
    "top<P>%/q8"                                    TopK(P / 100, values=Quantize(8)) (any quantize spec)
    "rand<P>%"  e.g. "rand10%"                      RandomK(P / 100) (rescaled)

``parse_compressor(spec)`` builds the compressor; ``describe()`` of a compressor built from a spec gives the
spec back.
"""

from __future__ import annotations

import re

from .base import Compressor
from .quantize import Quantize
from .sparsify import RandomK, TopK

QUANTIZE_SPECS = {"fp32": 32, "bf16": 16, "q8": 8, "q4": 4, "q2": 2}
_SPARSE = re.compile(r"^(top|rand)(\d+(?:\.\d+)?)%(?:/(\w+))?$")


def parse_compressor(spec) -> Compressor:
    """The compressor a spec names (see the module doc); a ``Compressor`` is returned as is."""
    if isinstance(spec, Compressor):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"a compressor spec must be a string such as 'q8' or 'top1%', got {spec!r}")
    if spec in QUANTIZE_SPECS:
        return Quantize(QUANTIZE_SPECS[spec])
    m = _SPARSE.match(spec)
    if m is None:
        raise ValueError(f"unknown compressor spec {spec!r}; use one of {sorted(QUANTIZE_SPECS)}, 'top<P>%', "
                         "'top<P>%/q8' or 'rand<P>%'")  # fmt: skip
    kind, percent, values = m.group(1), float(m.group(2)), m.group(3)
    if not 0 < percent <= 100:
        raise ValueError(f"compressor spec {spec!r}: the percentage must be in (0, 100]")
    if kind == "rand":
        if values is not None:
            raise ValueError(f"compressor spec {spec!r}: 'rand<P>%' takes no '/values' part")
        return RandomK(percent / 100)
    if values is not None and values not in QUANTIZE_SPECS:
        raise ValueError(f"compressor spec {spec!r}: the values part must be one of {sorted(QUANTIZE_SPECS)}")
    return TopK(percent / 100, values=Quantize(QUANTIZE_SPECS[values]) if values else None)
