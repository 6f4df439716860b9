"""Block-wise absmax quantization (the reference implementation in plain PyTorch).

A flat tensor is cut into blocks of ``block_size`` elements (the last one may be shorter). Each block is
divided by its absolute maximum (its *scale*), and every normalized value is rounded to a level of a
``QuantMap``. Codes are uint8, 4-bit codes packed two per byte; scales are float32 or bfloat16. A bfloat16
scale is rounded *up* from the fp32 absmax, so normalized values never exceed 1, and it has fp32's
exponent range, so it cannot overflow to inf the way an fp16 scale would.

The fused kernels in ``efficient_optim.kernels`` implement the same arithmetic and are tested against it.
"""

from __future__ import annotations

import torch

from .maps import QuantMap, floor_index, nearest_index
from .packing import pack_codes, packed_numel, unpack_codes
from .rounding import ROUNDING_MODES, uniform_from_hash

SCALE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_BF16_MAX_BITS = 0x7F7F0000  # largest finite bfloat16, as fp32 bits


def num_blocks(numel: int, block_size: int) -> int:
    return (numel + block_size - 1) // block_size


def check_finite(x: torch.Tensor, what: str = "tensor") -> None:
    """Raise ``FloatingPointError`` if ``x`` holds NaN or Inf: they are never encoded."""
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise FloatingPointError(f"{what} contains NaN or Inf values; refusing to quantize it")


def round_scale_up(absmax: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """Scales as stored: fp32 as is, bfloat16 rounded toward +inf (clamped to the largest finite bf16)."""
    absmax = absmax.to(torch.float32)
    if scale_dtype == torch.float32:
        return absmax
    if scale_dtype != torch.bfloat16:
        raise ValueError(f"scale dtype must be float32 or bfloat16, got {scale_dtype}")
    bits = absmax.contiguous().view(torch.int32).to(torch.int64)
    up = ((bits + 0xFFFF) & 0xFFFF0000).clamp(max=_BF16_MAX_BITS)
    return up.to(torch.int32).view(torch.float32).to(torch.bfloat16)


def block_absmax(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Absolute maximum of each block of the flat tensor ``x`` (fp32)."""
    n = x.numel()
    nb = num_blocks(n, block_size)
    pad = nb * block_size - n
    flat = x.reshape(-1).to(torch.float32).abs()
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(nb, block_size).amax(dim=1) if nb else flat.new_zeros(0)


def _per_element(scales: torch.Tensor, numel: int, block_size: int) -> torch.Tensor:
    return scales.to(torch.float32).repeat_interleave(block_size)[:numel]


def encode_normalized(qmap: QuantMap, u: torch.Tensor, rounding: str, salt: int = 0) -> torch.Tensor:
    """Codes (int64) of normalized values ``u`` in the map's range, rounded as asked."""
    levels = qmap.levels.to(u.device)
    u = u.clamp(float(levels[0]), float(levels[-1]))
    if rounding == "nearest":  # ties (u exactly on an fp32 midpoint) round up
        return nearest_index(qmap, u)
    if rounding != "stochastic":
        raise ValueError(f"rounding must be one of {ROUNDING_MODES}, got {rounding!r}")
    lo = floor_index(levels, u)
    hi = (lo + 1).clamp(max=qmap.num_levels - 1)
    below = u - levels[lo]
    gap = levels[hi] - levels[lo]
    r = uniform_from_hash(u.numel(), salt, device=u.device).view_as(u)
    return torch.where(r * gap < below, hi, lo)


def quantize_blockwise(
    x: torch.Tensor,
    qmap: QuantMap,
    block_size: int,
    rounding: str = "nearest",
    salt: int = 0,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` block-wise.

    Args:
        x: any float tensor; read flat. NaN/Inf raise ``FloatingPointError``.
        qmap: the levels to round to (see ``get_map``).
        block_size: elements per block (the last block may be shorter); even for 4-bit maps.
        rounding: ``"nearest"`` or ``"stochastic"`` (reproducible from ``salt``).
        salt: 32-bit seed of the stochastic rounding draws.
        scale_dtype: ``torch.float32`` (default) or ``torch.bfloat16``.

    Returns:
        ``(codes, scales)``: uint8 codes (packed two per byte at 4 bits) and one scale per block.
    """
    check_finite(x, "input")
    validate_block_size(block_size, qmap.bits)
    flat = x.reshape(-1).to(torch.float32)
    n = flat.numel()
    scales = round_scale_up(block_absmax(flat, block_size), scale_dtype)
    s = scales.to(torch.float32)
    # multiply by the fp32 reciprocal of the scale (0 for an all-zero block), as the fused kernel does
    inv = torch.where(s > 0, 1.0 / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))
    u = flat * _per_element(inv, n, block_size)
    codes = encode_normalized(qmap, u, rounding, salt)
    return pack_codes(codes, qmap.bits), scales


def dequantize_blockwise(
    codes: torch.Tensor, scales: torch.Tensor, qmap: QuantMap, block_size: int, numel: int
) -> torch.Tensor:
    """Flat fp32 tensor of ``numel`` values decoded from ``codes`` and ``scales``."""
    idx = unpack_codes(codes, qmap.bits, numel)
    levels = qmap.levels.to(codes.device)
    return levels[idx] * _per_element(scales, numel, block_size)


def validate_block_size(block_size: int, bits: int) -> None:
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 2:
        raise ValueError(f"block_size must be an integer >= 2, got {block_size!r}")
    if bits == 4 and block_size % 2:
        raise ValueError(f"block_size must be even for 4-bit codes (two per byte), got {block_size}")


def quantized_nbytes(numel: int, bits: int, block_size: int, scale_dtype: torch.dtype) -> int:
    """Exact bytes of codes + scales for a tensor of ``numel`` elements."""
    return packed_numel(numel, bits) + num_blocks(numel, block_size) * torch.empty(0, dtype=scale_dtype).element_size()
