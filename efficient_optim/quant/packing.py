"""Packing of 4-bit codes two per byte: element ``2k`` in the low nibble, ``2k + 1`` in the high nibble."""

from __future__ import annotations

import torch


def packed_numel(numel: int, bits: int) -> int:
    """Bytes needed for ``numel`` codes of ``bits`` bits."""
    return numel if bits == 8 else (numel + 1) // 2


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a flat int tensor of codes (< 2**bits) into uint8 bytes."""
    codes = codes.to(torch.uint8).flatten()
    if bits == 8:
        return codes
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    pairs = codes.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: int64 codes, ``numel`` of them."""
    if bits == 8:
        return packed[:numel].to(torch.int64)
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack([lo, hi], dim=1).flatten()[:numel].to(torch.int64)
