"""One tensor in fewer bits: quantization maps, block-wise absmax quantization, 4-bit packing, rounding."""

from .blockwise import (
    SCALE_DTYPES,
    check_finite,
    dequantize_blockwise,
    num_blocks,
    quantize_blockwise,
    quantized_nbytes,
    round_scale_up,
)
from .maps import MAP_NAMES, QuantMap, get_map, learned_map
from .packing import pack_codes, packed_numel, unpack_codes
from .rounding import ROUNDING_MODES, mix_salt, uniform_from_hash

__all__ = [
    "MAP_NAMES",
    "ROUNDING_MODES",
    "SCALE_DTYPES",
    "QuantMap",
    "check_finite",
    "dequantize_blockwise",
    "get_map",
    "learned_map",
    "mix_salt",
    "num_blocks",
    "pack_codes",
    "packed_numel",
    "quantize_blockwise",
    "quantized_nbytes",
    "round_scale_up",
    "uniform_from_hash",
    "unpack_codes",
]
