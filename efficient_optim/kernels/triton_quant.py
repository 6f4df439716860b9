"""Triton block quantizer and non-finite scan: ``quantize_into``, ``dequantize_into``, ``any_nonfinite_f32``.

Same argument lists as the CPU kernel's entry points of the same names (``cpu_adamw.cpp``) and the same
results bit for bit (see ``triton_common``); used by the quantized state codec for every rule, and by tests.
``nonfinite_flag`` is the multi-tensor, sync-free form of the NaN/Inf scan: one launch over many gradients
sets a device flag that the step kernels read (``found_inf``), so a bad gradient skips the step without the
host waiting for the answer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import (
    check_block_size,
    check_codes,
    check_device,
    decode_tile,
    device_table,
    encode_tile,
    launch,
    map_args,
    reduce_max,
    salt_i32,
    scales_view,
    tile_indices,
    tile_shape,
)

SCAN_TILE = 4096  # elements per program of the non-finite scan


@triton.jit(do_not_specialize=["salt", "numel", "block_size"])
def _quantize_kernel(
    x_ptr,
    codes,
    scales,
    x_levels,
    x_lut,
    x_mids,
    x_mid_lut,
    x_mbits,
    x_erange,
    x_mid_mbits,
    x_mid_erange,
    x_nlev,
    salt,
    numel,
    block_size,
    X_BITS: tl.constexpr,
    X_SIGNED: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    BF16: tl.constexpr,
    BPP: tl.constexpr,
    BSP2: tl.constexpr,
):
    block, index, mask, mask_b = tile_indices(tl.program_id(0) * BPP, numel, block_size, BPP, BSP2)
    x = tl.load(x_ptr + index, mask=mask, other=0.0).to(tl.float32)
    encode_tile(
        x,
        codes,
        scales,
        x_levels,
        x_lut,
        x_mids,
        x_mid_lut,
        x_mbits,
        x_erange,
        x_mid_mbits,
        x_mid_erange,
        x_nlev,
        salt,
        block,
        index,
        mask,
        mask_b,
        block_size,
        X_BITS,
        X_SIGNED,
        STOCHASTIC,
        BF16,
        BPP,
        BSP2,
    )


@triton.jit(do_not_specialize=["numel", "block_size"])
def _dequantize_kernel(
    codes,
    scales,
    levels,
    out,
    numel,
    block_size,
    BITS: tl.constexpr,
    BF16: tl.constexpr,
    BPP: tl.constexpr,
    BSP2: tl.constexpr,
):
    block, index, mask, mask_b = tile_indices(tl.program_id(0) * BPP, numel, block_size, BPP, BSP2)
    tl.store(
        out + index, decode_tile(codes, scales, levels, block, index, mask, mask_b, BITS, BF16), mask=mask
    )


@triton.jit(do_not_specialize=["numel"])
def _nonfinite_kernel(t_ptr, flag, numel, TILE: tl.constexpr):
    index = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
    bits = tl.load(t_ptr + index, mask=index < numel, other=0.0).to(tl.float32).to(tl.uint32, bitcast=True)
    bad = reduce_max(((bits & 0x7F800000) == 0x7F800000).to(tl.int32), 0)
    tl.store(flag, bad, mask=bad > 0)


def quantize_into(x, codes, scales, tables, geometry, is_signed, bits, stochastic, salt, block_size) -> None:
    """Block-wise quantize the contiguous fp32 tensor ``x`` into existing ``codes`` and ``scales``.

    Args:
        x: contiguous fp32 values (must be finite, as for the CPU kernel).
        codes: uint8 codes, ``numel`` bytes at 8 bits, ``ceil(numel / 2)`` at 4 bits; written.
        scales: one fp32 or bf16 scale per block; written.
        tables, geometry, is_signed: the map's ``[levels, lut, midpoints, mid_lut]``, bucket geometry
            ``[mant, exp, mid_mant, mid_exp]`` and signedness.
        bits: 4 or 8. stochastic: stochastic (True) or nearest rounding. salt: 32-bit rounding salt.
        block_size: elements per block (>= 2; even at 4 bits).
    """
    check_device("x", x)
    if x.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError("x must be contiguous fp32")
    check_block_size(block_size, (bits,))
    numel = x.numel()
    check_codes("x", codes, scales, numel, bits, block_size)
    if numel == 0:
        return
    runtime, constants = map_args("x", tables, geometry, is_signed, bits, x.device)
    scales_k, bf16 = scales_view(scales)
    bpp, bsp2 = tile_shape(block_size)
    nblocks = scales.numel()
    args = dict(x_ptr=x, codes=codes, scales=scales_k, **runtime, salt=salt_i32(salt), numel=numel,
                block_size=block_size)  # fmt: skip
    constants.update(STOCHASTIC=bool(stochastic), BF16=bf16, BPP=bpp, BSP2=bsp2)
    launch(_quantize_kernel, (triton.cdiv(nblocks, bpp),), args, constants, bpp * bsp2)


def dequantize_into(codes, scales, levels, bits, block_size, out) -> None:
    """Decode ``codes`` and ``scales`` (``levels[code] * scale``) into the contiguous fp32 tensor ``out``.

    Args:
        codes, scales: as written by ``quantize_into``. levels: the map's fp32 levels.
        bits: 4 or 8. block_size: elements per block. out: contiguous fp32, ``numel`` elements; written.
    """
    check_device("out", out)
    if out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError("out must be contiguous fp32")
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    check_block_size(block_size, (bits,))
    numel = out.numel()
    check_codes("", codes, scales, numel, bits, block_size)
    if numel == 0:
        return
    scales_k, bf16 = scales_view(scales)
    bpp, bsp2 = tile_shape(block_size)
    args = dict(codes=codes, scales=scales_k, levels=device_table(levels, out.device), out=out, numel=numel,
                block_size=block_size)  # fmt: skip
    constants = dict(BITS=bits, BF16=bf16, BPP=bpp, BSP2=bsp2)
    launch(_dequantize_kernel, (triton.cdiv(scales.numel(), bpp),), args, constants, bpp * bsp2)


def nonfinite_flag(tensors, flag: torch.Tensor) -> torch.Tensor:
    """Set ``flag`` (an int32 tensor of one element, on the kernels' device) to 1 if any of ``tensors`` (fp32,
    bf16 or fp16, contiguous) holds a NaN or Inf; it is never reset here. Returns ``flag``. No host sync."""
    check_device("flag", flag)
    if flag.dtype != torch.int32 or flag.numel() != 1:
        raise ValueError("flag must be an int32 tensor of one element")
    for t in tensors:
        if t.numel() == 0:
            continue
        check_device("tensor", t)
        if not t.is_contiguous() or t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError("nonfinite_flag scans contiguous fp32, bf16 or fp16 tensors")
        launch(_nonfinite_kernel, (triton.cdiv(t.numel(), SCAN_TILE),), dict(t_ptr=t, flag=flag, numel=t.numel()),
               dict(TILE=SCAN_TILE), SCAN_TILE)  # fmt: skip
    return flag


def any_nonfinite_f32(t) -> bool:
    """True if the contiguous fp32 tensor ``t`` holds a NaN or Inf (checked on the bit pattern). Waits for
    the answer (a host sync); the step kernels' ``found_inf`` flag avoids that."""
    check_device("t", t)
    if t.dtype != torch.float32 or not t.is_contiguous():
        raise ValueError("expects a contiguous fp32 tensor")
    flag = torch.zeros(1, dtype=torch.int32, device=t.device)
    return bool(nonfinite_flag([t], flag).item())
