"""Block-wise quantization of a gradient at 32, 16, 8, 4 or 2 bits per element.

- 32: a float32 copy (exact; the reference every other setting is compared with).
- 16: bfloat16 (fp32's exponent range: a large gradient cannot overflow as in fp16), rounded to nearest
  or stochastically.
- 8 and 4: ``efficient_optim.quant``'s block-wise absmax quantizer (the optimizer states' arithmetic) with a
  signed map (``linear`` by default at 8 bits, ``softsign`` at 4), 4-bit codes packed two per byte.
- 2: the same quantizer with a 2-bit signed map, codes packed four per byte (``quant`` packs 4 and 8 bits;
  the 2-bit packing and maps live here). ``linear_nozero`` (default) is {-1, -1/3, +1/3, +1} x the block's
  absmax; ``linear`` is {-1, 0, +1} (ternary, as TernGrad: most entries round to 0).

The default maps are the ones with the lowest error on a language model's gradients (docs/mango.md has the
measurement); every map of ``efficient_optim.quant`` can be chosen at 8 and 4 bits.

Bytes of a tensor of n elements: ``ceil(n * bits / 8)`` codes + one scale (4 B fp32 or 2 B bf16) per block.
"""

from __future__ import annotations

from functools import cache

import torch

from ..quant import (
    QuantMap,
    num_blocks,
    packed_numel,
    quantize_blockwise,
    uniform_from_hash,
    unpack_codes,
)
from ..quant.rounding import ROUNDING_MODES
from ..state.quantized import Quantized
from .base import Compressor, Layout

QUANTIZE_BITS = (32, 16, 8, 4, 2)
DEFAULT_MAPS = {8: "linear", 4: "softsign", 2: "linear_nozero"}  # the lowest error on LM gradients (docs/mango.md)
MAPS_2BIT = {"linear": (-1.0, 0.0, 1.0), "linear_nozero": (-1.0, -1.0 / 3.0, 1.0 / 3.0, 1.0)}
SCALE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@cache
def map_2bit(name: str) -> QuantMap:
    """The signed 2-bit map ``name`` (``linear``: {-1, 0, 1}; ``linear_nozero``: {-1, -1/3, 1/3, 1})."""
    if name not in MAPS_2BIT:
        raise ValueError(f"unknown 2-bit map {name!r}; choose one of {sorted(MAPS_2BIT)}")
    return QuantMap(name, 2, True, torch.tensor(MAPS_2BIT[name], dtype=torch.float32))


def pack_2bit(codes: torch.Tensor) -> torch.Tensor:
    """Pack a flat tensor of 2-bit codes (< 4) four per byte: element ``4k + j`` in bits ``2j, 2j + 1``."""
    codes = codes.to(torch.uint8).flatten()
    pad = (-codes.numel()) % 4
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    q = codes.view(-1, 4)
    return q[:, 0] | (q[:, 1] << 2) | (q[:, 2] << 4) | (q[:, 3] << 6)


def unpack_2bit(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of ``pack_2bit``: ``numel`` int64 codes."""
    parts = [(packed >> shift) & 0x03 for shift in (0, 2, 4, 6)]
    return torch.stack(parts, dim=1).flatten()[:numel].to(torch.int64)


def round_to_bf16(flat: torch.Tensor, rounding: str, salt: int) -> torch.Tensor:
    """``flat`` (float32) in bfloat16, rounded to nearest or stochastically (reproducible from ``salt``)."""
    if rounding == "nearest":
        return flat.to(torch.bfloat16)
    bits = flat.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    r = (uniform_from_hash(flat.numel(), salt, device=flat.device) * 65536).to(torch.int64)
    up = (bits + r) & 0xFFFF0000  # a carry out of the mantissa raises the exponent: the next bf16 up
    up = torch.where(up >= 2**31, up - 2**32, up).to(torch.int32)
    return up.view(torch.float32).to(torch.bfloat16)


class Quantize(Compressor):
    """Block-wise quantization (see the module doc).

    Args:
        bits: 32, 16, 8 (default), 4 or 2.
        block_size: elements per scale at 8/4/2 bits (default 128; even at 4 bits).
        map: the quantization map at 8/4/2 bits: any signed map of ``efficient_optim.quant`` at 8/4 bits
            (default ``linear`` at 8, ``softsign`` at 4), ``linear_nozero`` (default) or ``linear`` at 2 bits.
        rounding: ``"nearest"`` (default) or ``"stochastic"`` (unbiased; draws from ``compress``'s salt).
        scale_dtype: ``"float32"`` (default) or ``"bfloat16"`` (rounded up, half the scale bytes).
    """

    def __init__(self, bits: int = 8, block_size: int = 128, map: str | None = None, rounding: str = "nearest",
                 scale_dtype: str = "float32"):  # fmt: skip
        if bits not in QUANTIZE_BITS or isinstance(bits, bool):
            raise ValueError(f"bits must be one of {QUANTIZE_BITS}, got {bits!r}")
        if rounding not in ROUNDING_MODES:
            raise ValueError(f"rounding must be one of {ROUNDING_MODES}, got {rounding!r}")
        if scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {sorted(SCALE_DTYPES)}, got {scale_dtype!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
            raise ValueError(f"block_size must be an integer >= 2, got {block_size!r}")
        if bits == 4 and block_size % 2:
            raise ValueError(f"block_size must be even at 4 bits (two codes per byte), got {block_size}")
        if bits >= 16 and map is not None:
            raise ValueError(f"map applies to 8/4/2 bits only, got map={map!r} with bits={bits}")
        self.bits, self.block_size, self.rounding, self.scale_dtype = bits, block_size, rounding, scale_dtype
        self.map = map if map is not None else DEFAULT_MAPS.get(bits)
        self.qmap = None
        self._codec = None  # 8/4 bits: the optimizer states' codec (compiled quantizer on CPU, else the reference)
        if bits == 2:
            self.qmap = map_2bit(self.map)
        elif bits <= 8:
            self._codec = Quantized(bits, block_size, self.map, True, rounding, scale_dtype)
            self.qmap = self._codec.qmap

    def __repr__(self) -> str:
        extra = "" if self.bits >= 16 else f", block_size={self.block_size}, map={self.map!r}"
        return f"Quantize(bits={self.bits}{extra}, rounding={self.rounding!r})"

    def describe(self) -> str:
        return {32: "fp32", 16: "bf16"}.get(self.bits, f"q{self.bits}")

    def layout(self, numel: int) -> Layout:
        if self.bits == 32:
            return {"values": ((numel,), torch.float32)}
        if self.bits == 16:
            return {"values": ((numel,), torch.bfloat16)}
        codes = (numel + 3) // 4 if self.bits == 2 else packed_numel(numel, self.bits)
        return {"codes": ((codes,), torch.uint8),
                "scales": ((num_blocks(numel, self.block_size),), SCALE_DTYPES[self.scale_dtype])}  # fmt: skip

    def _compress(self, flat: torch.Tensor, salt: int) -> dict[str, torch.Tensor]:
        if self.bits == 32:
            return {"values": flat.clone()}
        if self.bits == 16:
            return {"values": round_to_bf16(flat, self.rounding, salt)}
        if self._codec is not None:
            state: dict = {}
            self._codec.init(state, "x", flat)
            self._codec.encode(state, "x", flat, salt=salt)
            return {"codes": state["x.codes"], "scales": state["x.scales"]}
        codes, scales = quantize_blockwise(flat, self.qmap, self.block_size, self.rounding, salt,
                                           SCALE_DTYPES[self.scale_dtype])  # fmt: skip
        # 2 bits: quant packs sub-byte codes as nibbles; repack four per byte
        return {"codes": pack_2bit(unpack_codes(codes, 4, flat.numel())), "scales": scales}

    def _decompress(self, tensors: dict[str, torch.Tensor], numel: int) -> torch.Tensor:
        if self.bits >= 16:
            return tensors["values"].to(torch.float32)
        codes, scales = tensors["codes"], tensors["scales"]
        if self._codec is not None:  # decode only reads the shape of its parameter argument
            return self._codec.decode({"x.codes": codes, "x.scales": scales}, "x", torch.empty(numel, device="meta"))
        levels = self.qmap.levels.to(codes.device)[unpack_2bit(codes, numel)]
        return levels * scales.to(torch.float32).repeat_interleave(self.block_size)[:numel]
