"""Block-wise quantized storage: uint8 codes (two per byte at 4 bits) plus one scale per block.

On the CPU, ``decode`` and ``encode`` of contiguous fp32 values run the compiled block quantizer of
``efficient_optim.kernels`` when it is available (bit-identical to ``quant.blockwise``, tested in
``tests/test_codec_kernels.py``; ``EFFOPT_DISABLE_KERNELS=1`` forces the PyTorch reference).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.cpu import load_cpu_kernels
from ..quant import (
    SCALE_DTYPES,
    QuantMap,
    dequantize_blockwise,
    get_map,
    num_blocks,
    packed_numel,
    quantize_blockwise,
)
from ..quant.blockwise import validate_block_size
from ..quant.rounding import ROUNDING_MODES
from .codec import StateCodec

DEFAULT_BLOCK_SIZE = {8: 256, 4: 128}


def _plain_cpu(*ts: torch.Tensor) -> bool:
    return all(type(t) is torch.Tensor and t.device.type == "cpu" and t.is_contiguous() for t in ts)


def _kernels(*ts: torch.Tensor):
    """The compiled module when these tensors can go through it (plain contiguous CPU tensors), else None."""
    return load_cpu_kernels() if _plain_cpu(*ts) else None


@dataclass(frozen=True)
class Quantized(StateCodec):
    """A block-wise absmax-quantized state.

    Args:
        bits: 8 (default) or 4 (packed two codes per byte).
        block_size: elements per block; ``None`` (default) picks 256 at 8 bits, 128 at 4 bits. Any size
            >= 2 works (even at 4 bits); a last block that does not fill up is handled.
        map: quantization map name (``dynamic`` (default), ``linear``, ``linear_nozero``, ``softsign``)
            or a ``QuantMap`` (e.g. a learned one).
        signed: True (default) for states that change sign (momentum), False for non-negative ones.
        rounding: ``"nearest"`` (default) or ``"stochastic"``.
        scale_dtype: ``"float32"`` (default) or ``"bfloat16"`` (rounded up; half the scale bytes, no
            overflow since bf16 has the fp32 exponent range).
    """

    bits: int = 8
    block_size: int | None = None
    map: str | QuantMap = "dynamic"
    signed: bool = True
    rounding: str = "nearest"
    scale_dtype: str = "float32"

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"bits of a quantized state must be 4 or 8, got {self.bits!r}")
        if self.block_size is None:
            object.__setattr__(self, "block_size", DEFAULT_BLOCK_SIZE[self.bits])
        validate_block_size(self.block_size, self.bits)
        if self.rounding not in ROUNDING_MODES:
            raise ValueError(f"rounding must be one of {ROUNDING_MODES}, got {self.rounding!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {sorted(SCALE_DTYPES)}, got {self.scale_dtype!r}")
        qmap = self.map if isinstance(self.map, QuantMap) else get_map(self.map, self.bits, self.signed)
        if qmap.bits != self.bits:
            raise ValueError(f"map has {qmap.bits} bits but the codec has {self.bits}")
        object.__setattr__(self, "_qmap", qmap)

    @property
    def qmap(self) -> QuantMap:
        return self._qmap  # type: ignore[attr-defined]

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    def describe(self, param=None) -> str:
        """``"8bit"`` or ``"4bit"``."""
        return f"{self.bits}bit"

    @property
    def is_elementwise(self) -> bool:
        """True: on a DTensor shard the codes and scales are those of the local shard (``sharded.ShardLocal``),
        blocks starting at the shard's first element."""
        return True

    @property
    def scale_block_size(self) -> int:
        return self.block_size

    def expected(self, name, param):
        n = param.numel()
        return {
            f"{name}.codes": ((packed_numel(n, self.bits),), torch.uint8),
            f"{name}.scales": ((num_blocks(n, self.block_size),), self.torch_scale_dtype),
        }

    def init(self, state, name, param):
        dev = param.device
        n = param.numel()
        state[f"{name}.codes"] = torch.zeros(packed_numel(n, self.bits), dtype=torch.uint8, device=dev)
        state[f"{name}.scales"] = torch.zeros(num_blocks(n, self.block_size), dtype=self.torch_scale_dtype, device=dev)

    def decode(self, state, name, param):
        codes, scales = state[f"{name}.codes"], state[f"{name}.scales"]
        kernels = _kernels(codes, scales)
        if kernels is not None:
            out = torch.empty(param.shape, dtype=torch.float32)
            kernels.dequantize_into(codes, scales, self.qmap.levels, self.bits, self.block_size, out)
            return out
        return dequantize_blockwise(codes, scales, self.qmap, self.block_size, param.numel()).view(param.shape)

    def encode(self, state, name, value, *, salt=0):
        codes, scales = state[f"{name}.codes"], state[f"{name}.scales"]
        kernels = _kernels(value, codes, scales)
        if kernels is not None and value.dtype == torch.float32:
            if kernels.any_nonfinite_f32(value):
                raise FloatingPointError("input contains NaN or Inf values; refusing to quantize it")
            q = self.qmap
            tables = [q.levels, q.lut, q.midpoints, q.mid_lut]
            geometry = [q.lut_mantissa_bits, q.lut_exp_range, q.mid_mantissa_bits, q.mid_exp_range]
            kernels.quantize_into(value, codes, scales, tables, geometry, q.signed, self.bits,
                                  self.rounding == "stochastic", salt, self.block_size)  # fmt: skip
            return
        new_codes, new_scales = quantize_blockwise(
            value, self.qmap, self.block_size, self.rounding, salt, self.torch_scale_dtype
        )
        codes.copy_(new_codes)
        scales.copy_(new_scales)

    @property
    def kernel_kind(self) -> str:
        return "quantized"

    def kernel_operands(self, state, name) -> tuple:
        """``(codes, scales, [levels, lut, midpoints, mid_lut], [lut and midpoint bucket geometry], signed,
        bits, stochastic)``: the storage and the map's tables in the fused kernels' argument order."""
        q = self.qmap
        tables = [q.levels, q.lut, q.midpoints, q.mid_lut]
        geometry = [q.lut_mantissa_bits, q.lut_exp_range, q.mid_mantissa_bits, q.mid_exp_range]
        return (state[f"{name}.codes"], state[f"{name}.scales"], tables, geometry, q.signed, self.bits,
                self.rounding == "stochastic")  # fmt: skip

    def shared_tensors(self):
        tag = f"map.{self.qmap.name}.{self.bits}bit.{'signed' if self.signed else 'unsigned'}.{id(self.qmap):x}"
        return {f"{tag}.{k}": t for k, t in self.qmap.tables().items()}

    def __hash__(self):
        return hash((self.bits, self.block_size, id(self.qmap), self.signed, self.rounding, self.scale_dtype))

    def __eq__(self, other):
        return isinstance(other, Quantized) and hash(self) == hash(other) and self.qmap is other.qmap
