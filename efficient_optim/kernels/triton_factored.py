"""Fused HybridAdam step in Triton: block-quantized m and a factored v (row and column means).

Same argument list and arithmetic as the CPU kernel's ``adamw_quantized_factored_step``: ``V_hat``'s row
``i`` is ``(row[i] / s) * col`` with ``s = max(mean(row), row_eps)``; the AdamW update uses
``v = beta2 V_hat + (1 - beta2) g^2``; m is re-encoded; the new row and column means of v are accumulated
in float64 and rounded to fp32. Three launches: the mean of the old rows (one program), the fused step over
tiles of 32 rows x whole quantization blocks (each program accumulates its column sums over its 32 rows in
row order, as the CPU kernel does per chunk of 32 rows), and the reduction of the partial sums.

Bit-exactness with the CPU kernel: the parameters, codes and scales follow from the same fp32 operations
once ``s`` is the same; the column means are summed in the CPU kernel's order (rows in order within a chunk,
chunks in order), so they are equal. ``mean(row)`` and the row sums are float64 sums in another order (a
tree inside each tile): they round to the same fp32 value unless a float64 sum falls within its last bits of
an fp32 rounding boundary (about 1e-7 per statistic for rows of a few thousand), when they differ by one fp32
ulp. The tests check equality on their cases.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .triton_adamw import adam_scalars, adamw_math, inverse_sqrt_bc2
from .triton_common import (
    TILE_ELEMENTS,
    check_block_size,
    check_codes,
    check_device,
    decode_tile,
    encode_tile,
    launch,
    map_args,
    reduce_sum,
    row_col_means_kernel,
    salt_i32,
    scales_view,
)

CHUNK_ROWS = 32  # rows per program: the CPU kernel's chunk, so the column sums add in the same order
SUM_TILE = 1024


@triton.jit(do_not_specialize=["R"])
def _row_scale_kernel(row, scale_out, R, row_eps, TILE: tl.constexpr):
    """``scale_out[0] = max(float(sum(row) / R), row_eps)`` (the sum in float64)."""
    total = tl.full([TILE], 0, tl.float64)
    for start in range(0, R, TILE):
        i = start + tl.arange(0, TILE)
        total += tl.load(row + i, mask=i < R, other=0.0).to(tl.float64)
    mean = (reduce_sum(total, 0) / R.to(tl.float64)).to(tl.float32)
    tl.store(scale_out, tl.where(mean > row_eps, mean, row_eps))


@triton.jit(do_not_specialize=["m_salt", "R", "C", "block_size", "num_tiles"])
def _factored_kernel(
    p_ptr, g_ptr, m_codes, m_scales,
    m_levels, m_lut, m_mids, m_mid_lut, m_mbits, m_erange, m_mid_mbits, m_mid_erange, m_nlev,
    m_salt, row, col, scale_in, row_part, col_part, R, C, block_size, num_tiles,
    decay, omb1, beta2, omb2, eps, step_size, inv_sqrt_bc2,
    M_BITS: tl.constexpr, M_SIGNED: tl.constexpr, M_STOCH: tl.constexpr, M_BF16: tl.constexpr,
    CHUNK: tl.constexpr, NBT: tl.constexpr, BSP2: tl.constexpr,
):  # fmt: skip
    chunk = tl.program_id(0)
    tile = tl.program_id(1)
    per_row = C // block_size
    scale = tl.load(scale_in)
    blk = tile * NBT + tl.arange(0, NBT)[:, None]  # block within the row [NBT, 1]
    j = blk * block_size + tl.arange(0, BSP2)[None, :]  # column [NBT, BSP2]
    col_mask = (blk < per_row) & (tl.arange(0, BSP2)[None, :] < block_size)
    col_v = tl.load(col + j, mask=col_mask, other=0.0)
    col_sum = tl.full([NBT, BSP2], 0, tl.float64)
    for r in range(CHUNK):
        i = chunk * CHUNK + r
        live = (
            tl.full([1, 1], 0, tl.int32) + i
        ) < R  # a [1, 1] tensor: the interpreter mis-types scalar masks
        mask = col_mask & live
        mask_b = (blk < per_row) & live
        block = i * per_row + blk
        index = i.to(tl.int64) * C + j
        r_scaled = tl.math.div_rn(tl.load(row + tl.minimum(i, R - 1)), scale)  # a dead row's value is unused
        p = tl.load(p_ptr + index, mask=mask, other=0.0)
        g = tl.load(g_ptr + index, mask=mask, other=0.0).to(tl.float32)
        m = decode_tile(m_codes, m_scales, m_levels, block, index, mask, mask_b, M_BITS, M_BF16)
        p, m, v = adamw_math(
            p, g, m, r_scaled * col_v, decay, omb1, beta2, omb2, eps, step_size, inv_sqrt_bc2
        )
        tl.store(p_ptr + index, p, mask=mask)
        encode_tile(m, m_codes, m_scales, m_levels, m_lut, m_mids, m_mid_lut, m_mbits, m_erange, m_mid_mbits,
                    m_mid_erange, m_nlev, m_salt, block, index, mask, mask_b, block_size, M_BITS, M_SIGNED, M_STOCH,
                    M_BF16, NBT, BSP2)  # fmt: skip
        v64 = tl.where(mask, v, 0.0).to(tl.float64)
        col_sum += v64
        tl.store(
            row_part + i.to(tl.int64) * num_tiles + tile + tl.full([1, 1], 0, tl.int64),
            reduce_sum(reduce_sum(v64, 1, True), 0, True),
            mask=live,
        )
    tl.store(col_part + chunk.to(tl.int64) * C + j, col_sum, mask=col_mask)


def adamw_quantized_factored_step(p, g, m_codes, m_scales, m_tables, m_geometry, m_signed, m_bits, m_stochastic,
                                  m_salt, block_size, row, col, row_eps, lr, beta1, beta2, eps, weight_decay,
                                  step_size, sqrt_bc2) -> None:  # fmt: skip
    """One fused AdamW step of the (R, C) fp32 matrix ``p``: m block-quantized, v factored (in place).

    Args:
        p: contiguous fp32 (R, C) parameter, updated in place. g: its gradient (fp32/bf16/fp16, same shape).
        m_codes, m_scales, m_tables, m_geometry, m_signed, m_bits, m_stochastic, m_salt: m's storage, map,
            rounding and salt (as ``adamw_quantized_step``).
        block_size: m's quantization block; must divide C (every block inside one row).
        row, col: fp32 row means (R,) and column means (C,) of v; replaced by the new ones.
        row_eps: floor of ``mean(row)`` in the reconstruction (``Factored.eps``).
        lr, beta1, beta2, eps, weight_decay, step_size, sqrt_bc2: as ``adamw_quantized_step``.
    """
    check_device("p", p)
    check_device("g", g)
    if p.dtype != torch.float32 or p.dim() != 2 or not p.is_contiguous():
        raise ValueError("p must be a contiguous fp32 matrix")
    if g.shape != p.shape or g.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError("g must be fp32/bf16/fp16 with p's shape")
    R, C = p.shape
    if row.dtype != torch.float32 or not row.is_contiguous() or row.numel() != R:
        raise ValueError("row must be contiguous fp32 (R,)")
    if col.dtype != torch.float32 or not col.is_contiguous() or col.numel() != C:
        raise ValueError("col must be contiguous fp32 (C,)")
    check_block_size(block_size, (m_bits,))
    if C % block_size:
        raise ValueError(f"block_size {block_size} must divide the row length {C}")
    check_codes("m", m_codes, m_scales, R * C, m_bits, block_size)
    if R * C == 0:
        return
    run, const = map_args("m", m_tables, m_geometry, m_signed, m_bits, p.device)
    ms, bf16 = scales_view(m_scales)
    bsp2 = max(2, triton.next_power_of_2(block_size))
    per_row = C // block_size
    nbt = max(1, min(triton.next_power_of_2(per_row), TILE_ELEMENTS // bsp2))
    num_tiles, num_chunks = triton.cdiv(per_row, nbt), triton.cdiv(R, CHUNK_ROWS)
    dev = p.device
    scale = torch.empty(1, dtype=torch.float32, device=dev)
    row_part = torch.empty(R * num_tiles, dtype=torch.float64, device=dev)
    col_part = torch.empty(num_chunks * C, dtype=torch.float64, device=dev)
    launch(_row_scale_kernel, (1,), dict(row=row, scale_out=scale, R=R, row_eps=float(np.float32(row_eps))),
           dict(TILE=SUM_TILE), SUM_TILE)  # fmt: skip
    args = dict(p_ptr=p, g_ptr=g.contiguous(), m_codes=m_codes, m_scales=ms, **run, m_salt=salt_i32(m_salt),
                row=row, col=col, scale_in=scale, row_part=row_part, col_part=col_part, R=R, C=C,
                block_size=block_size, num_tiles=num_tiles, **adam_scalars(lr, beta1, beta2, eps, weight_decay),
                step_size=float(np.float32(step_size)), inv_sqrt_bc2=inverse_sqrt_bc2(sqrt_bc2))  # fmt: skip
    const.update(M_STOCH=bool(m_stochastic), M_BF16=bf16, CHUNK=CHUNK_ROWS, NBT=nbt, BSP2=bsp2)
    launch(_factored_kernel, (num_chunks, num_tiles), args, const, nbt * bsp2)
    launch(row_col_means_kernel, (triton.cdiv(max(R, C), SUM_TILE),),
           dict(row=row, col=col, row_part=row_part, col_part=col_part, R=R, C=C, num_tiles=num_tiles,
                num_chunks=num_chunks), dict(TILE=SUM_TILE), SUM_TILE)  # fmt: skip
