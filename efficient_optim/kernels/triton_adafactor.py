"""Adafactor's factored step in Triton, with every reduction in a fixed order (``adafactor_order``).

``adafactor_factored_step`` updates an (R, C) fp32 matrix, its row and column means of the second moment, and
an optional first moment (block-quantized or dense fp32) in six launches, no result read back to the host:

1. ``_stats_kernel`` over tiles of ``ROWS`` x ``COLS``: ``sq = g*g + eps1``; per tile the row sums, the column
   sums and (to scale the step by the parameter's RMS) the sum of ``p*p``, each a pairwise tree;
2. ``row_col_means_kernel`` (triton_common): each row's tile sums and each column's chunk sums added in order,
   divided in fp64;
3. ``_vector_kernel`` (one program): the new row and column statistics, their means, the reciprocal square
   roots ``a`` (rows) and ``b`` (columns) of the factored estimate, and what the state stores;
4. ``_update_sq_kernel``: per tile the sum of ``u*u`` for ``u = (a_i b_j) g_ij`` (the update's RMS);
5. ``_scalars_kernel`` (one program): the step size (relative step x parameter scale) and the clipping, in fp64;
6. ``_apply_kernel``: ``u`` again, times the step, through the first moment, weight decay, into ``p``.

The order of every floating-point operation is the one ``adafactor_order`` defines and its NumPy/torch
transcription (``adafactor_order.adafactor_factored_step``) follows, so both store the same bits: sums are
fp64 pairwise trees over power-of-two tiles (adjacent pairs, written as reshape + split so no reduction
order is left to the compiler) combined tile after tile in a loop; element-wise fp32 operations are single
IEEE operations (``enable_fp_fusion=False``, ``div_rn``, ``sqrt_rn``). Importing this module needs Triton.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .adafactor_order import COLS, ROWS, VEC_TILE, AdafactorScalars
from .triton_common import (
    check_block_size,
    check_codes,
    check_device,
    decode_tile,
    encode_tile,
    launch,
    map_args,
    row_col_means_kernel,
    salt_i32,
    scales_view,
    tile_indices,
    tile_shape,
)

NO_M, QUANTIZED_M, DENSE_M = 0, 1, 2  # M_MODE values
APPLY_BLOCK = 1024  # elements per row of the apply tile when there is no quantized first moment
_G_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def tree_last(x, M: tl.constexpr, N: tl.constexpr, LOG_N: tl.constexpr):
    """Sums of the [M, N] tile ``x`` along its last axis (N = 2**LOG_N) as a pairwise tree of adjacent pairs:
    ``x[2k] + x[2k+1]``, then the same on the halves; returns [M]."""
    for level in tl.static_range(LOG_N):
        x = tl.reshape(x, [M, N >> (level + 1), 2])
        lo, hi = tl.split(x)
        x = lo + hi
    return tl.reshape(x, [M])


@triton.jit
def tree_all(x, M: tl.constexpr, N: tl.constexpr, LOG_M: tl.constexpr, LOG_N: tl.constexpr):
    """Sum of the [M, N] tile: the tree along each row, then the tree over the rows' sums; returns [1]."""
    rows = tree_last(x, M, N, LOG_N)
    return tree_last(tl.reshape(rows, [1, M]), 1, M, LOG_M)


@triton.jit
def _tile(first_row, first_col, R, C, M: tl.constexpr, N: tl.constexpr):
    """Row indices [M, 1], column indices [1, N], flat int64 indices and mask of an [M, N] tile."""
    i = first_row + tl.arange(0, M)[:, None]
    j = first_col + tl.arange(0, N)[None, :]
    mask = (i < R) & (j < C)
    return i, j, i.to(tl.int64) * C + j, mask


@triton.jit(do_not_specialize=["R", "C", "num_tiles"])
def _stats_kernel(p_ptr, g_ptr, row_part, col_part, p_part, R, C, num_tiles, eps1, G_DTYPE: tl.constexpr,
                  SCALE_P: tl.constexpr, M: tl.constexpr, N: tl.constexpr, LOG_M: tl.constexpr,
                  LOG_N: tl.constexpr):  # fmt: skip
    """Per (row chunk, column tile): the tree sums of ``g*g + eps1`` along each row and each column, and of
    ``p*p`` over the tile (fp64)."""
    chunk = tl.program_id(0)
    tile = tl.program_id(1)
    i, j, index, mask = _tile(chunk * M, tile * N, R, C, M, N)
    g = tl.load(g_ptr + index, mask=mask, other=0.0).to(tl.float32)
    sq = tl.where(mask, g * g + eps1, 0.0).to(tl.float64)
    rows = chunk * M + tl.arange(0, M)
    tl.store(row_part + rows.to(tl.int64) * num_tiles + tile, tree_last(sq, M, N, LOG_N), mask=rows < R)
    cols = tile * N + tl.arange(0, N)
    tl.store(col_part + chunk.to(tl.int64) * C + cols, tree_last(tl.trans(sq), N, M, LOG_M), mask=cols < C)
    if SCALE_P:
        p = tl.load(p_ptr + index, mask=mask, other=0.0).to(tl.float64)
        part = p_part + chunk.to(tl.int64) * num_tiles + tile + tl.full([1], 0, tl.int64)
        tl.store(part, tree_all(p * p, M, N, LOG_M, LOG_N))


@triton.jit
def _vector_mean(x_ptr, n, TILE: tl.constexpr, LOG_TILE: tl.constexpr):
    """fp32 mean of the fp32 vector ``x`` (n > 0): tree sums of fp64 tiles added in order, divided in fp64."""
    total = tl.full([1], 0, tl.float64)
    for start in range(0, n, TILE):
        k = start + tl.arange(0, TILE)
        x = tl.load(x_ptr + k, mask=k < n, other=0.0).to(tl.float64)
        total += tree_last(tl.reshape(x, [1, TILE]), 1, TILE, LOG_TILE)
    return (total / n.to(tl.float64)).to(tl.float32)


@triton.jit
def _blend(stat_ptr, msq_ptr, n, ratio, beta2t, one_minus, TILE: tl.constexpr, LOG_TILE: tl.constexpr):
    """``new = (stat * ratio) * beta2t + one_minus * msq`` written over ``msq``; returns the fp32 mean of new."""
    total = tl.full([1], 0, tl.float64)
    for start in range(0, n, TILE):
        k = start + tl.arange(0, TILE)
        live = k < n
        new = (tl.load(stat_ptr + k, mask=live, other=0.0) * ratio) * beta2t + one_minus * tl.load(
            msq_ptr + k, mask=live, other=0.0
        )
        tl.store(msq_ptr + k, new, mask=live)
        total += tree_last(tl.reshape(tl.where(live, new, 0.0).to(tl.float64), [1, TILE]), 1, TILE, LOG_TILE)
    return (total / n.to(tl.float64)).to(tl.float32)


@triton.jit
def _factors(new_ptr, stat_ptr, out_ptr, n, divisor, keep, DIVIDE: tl.constexpr, TILE: tl.constexpr):
    """``out = 1 / sqrt(new / divisor)`` (or ``1 / sqrt(new)``), and the stored statistic ``new * keep``."""
    for start in range(0, n, TILE):
        k = start + tl.arange(0, TILE)
        live = k < n
        new = tl.load(new_ptr + k, mask=live, other=1.0)
        x = tl.math.div_rn(new, tl.full([TILE], 0, tl.float32) + divisor) if DIVIDE else new
        one = tl.full([TILE], 1.0, tl.float32)
        tl.store(out_ptr + k, tl.math.div_rn(one, tl.sqrt_rn(x)), mask=live)
        tl.store(stat_ptr + k, new * keep, mask=live)


@triton.jit(do_not_specialize=["R", "C"])
def _vector_kernel(row, col, new_row, new_col, a_out, b_out, R, C, beta2t, one_minus, v_eps,
                   TILE: tl.constexpr, LOG_TILE: tl.constexpr):  # fmt: skip
    """One program: the new statistics from the old ones and the means of ``g*g + eps1`` (in ``new_row`` /
    ``new_col``, overwritten by the new statistics), the factors ``a``, ``b`` and the stored row/column."""
    old_r = _vector_mean(row, R, TILE, LOG_TILE)
    old_c = _vector_mean(col, C, TILE, LOG_TILE)
    scale = tl.where(old_r > v_eps, old_r, v_eps)
    mean_r = _blend(row, new_row, R, tl.math.div_rn(old_c, scale), beta2t, one_minus, TILE, LOG_TILE)
    mean_c = _blend(col, new_col, C, tl.math.div_rn(old_r, scale), beta2t, one_minus, TILE, LOG_TILE)
    tl.debug_barrier()  # the blends' stores are read (and row/col overwritten) by other threads below
    new_scale = tl.where(mean_r > v_eps, mean_r, v_eps)
    _factors(new_row, row, a_out, R, new_scale, tl.math.div_rn(mean_c, new_scale), True, TILE)
    _factors(new_col, col, b_out, C, new_scale, tl.math.div_rn(mean_r, new_scale), False, TILE)


@triton.jit(do_not_specialize=["R", "C", "num_tiles"])
def _update_sq_kernel(g_ptr, a_ptr, b_ptr, u_part, R, C, num_tiles, G_DTYPE: tl.constexpr, M: tl.constexpr,
                      N: tl.constexpr, LOG_M: tl.constexpr, LOG_N: tl.constexpr):  # fmt: skip
    """Per (row chunk, column tile): the tree sum of ``u*u`` (fp64), ``u = (a_i * b_j) * g_ij``."""
    chunk = tl.program_id(0)
    tile = tl.program_id(1)
    i, j, index, mask = _tile(chunk * M, tile * N, R, C, M, N)
    g = tl.load(g_ptr + index, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + i, mask=i < R, other=0.0)
    b = tl.load(b_ptr + j, mask=j < C, other=0.0)
    u = tl.where(mask, (a * b) * g, 0.0).to(tl.float64)
    tl.store(u_part + chunk.to(tl.int64) * num_tiles + tile + tl.full([1], 0, tl.int64),
             tree_all(u * u, M, N, LOG_M, LOG_N))  # fmt: skip


@triton.jit
def _parts_sum(part, n, TILE: tl.constexpr, LOG_TILE: tl.constexpr):
    """Sum of ``n`` fp64 partial sums: tree sums of tiles added in order; [1]."""
    total = tl.full([1], 0, tl.float64)
    for start in range(0, n, TILE):
        k = start + tl.arange(0, TILE)
        total += tree_last(tl.reshape(tl.load(part + k, mask=k < n, other=0.0), [1, TILE]), 1, TILE, LOG_TILE)
    return total


@triton.jit(do_not_specialize=["num_parts"])
def _scalars_kernel(u_part, p_part, hyper, out, num_parts, SCALE_P: tl.constexpr, TILE: tl.constexpr,
                    LOG_TILE: tl.constexpr):  # fmt: skip
    """fp64: ``lr = max(eps2, RMS(p)) * rel`` (or ``rel``), ``d = max(1, RMS(u) / clip)``; stores the fp32
    step multiplier ``lr / d`` and weight-decay factor ``weight_decay * lr``. ``hyper``: fp64
    ``[rel, eps2, clip_threshold, weight_decay, numel]``."""
    zero = tl.full([1], 0, tl.int32)
    rel, eps2, clip = tl.load(hyper + zero), tl.load(hyper + 1 + zero), tl.load(hyper + 2 + zero)
    wd, numel = tl.load(hyper + 3 + zero), tl.load(hyper + 4 + zero)
    lr = rel
    if SCALE_P:
        rms_p = tl.sqrt(_parts_sum(p_part, num_parts, TILE, LOG_TILE) / numel)  # fp64: sqrt.rn.f64
        lr = tl.where(rms_p > eps2, rms_p, eps2) * rel
    q = tl.sqrt(_parts_sum(u_part, num_parts, TILE, LOG_TILE) / numel) / clip
    d = tl.where(q > 1.0, q, 1.0)
    tl.store(out + zero, (lr / d).to(tl.float32))
    tl.store(out + 1 + zero, (wd * lr).to(tl.float32))


@triton.jit(do_not_specialize=["m_salt", "numel", "C", "block_size"])
def _apply_kernel(
    p_ptr, g_ptr, a_ptr, b_ptr, scalars, m_ptr, m_scales,
    m_levels, m_lut, m_mids, m_mid_lut, m_mbits, m_erange, m_mid_mbits, m_mid_erange, m_nlev,
    m_salt, numel, C, block_size, beta1, one_minus_beta1,
    G_DTYPE: tl.constexpr, M_MODE: tl.constexpr, M_BITS: tl.constexpr, M_SIGNED: tl.constexpr,
    M_STOCH: tl.constexpr, M_BF16: tl.constexpr, WD: tl.constexpr, BPP: tl.constexpr, BSP2: tl.constexpr,
):  # fmt: skip
    """``upd = ((a_i b_j) g) * (lr / d)``; with a first moment ``m = m beta1 + (1 - beta1) upd`` and
    ``upd = m``; ``p = p - p * (wd lr)`` when weight decay is on; ``p = p - upd``."""
    block, index, mask, mask_b = tile_indices(tl.program_id(0) * BPP, numel, block_size, BPP, BSP2)
    i = index // C
    zero = tl.full([1, 1], 0, tl.int32)
    coef = tl.load(scalars + zero)
    p = tl.load(p_ptr + index, mask=mask, other=0.0)
    g = tl.load(g_ptr + index, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + i, mask=mask, other=0.0)
    b = tl.load(b_ptr + (index - i * C), mask=mask, other=0.0)
    upd = ((a * b) * g) * coef
    if M_MODE == 1:
        m = decode_tile(m_ptr, m_scales, m_levels, block, index, mask, mask_b, M_BITS, M_BF16)
        upd = m * beta1 + one_minus_beta1 * upd
        encode_tile(upd, m_ptr, m_scales, m_levels, m_lut, m_mids, m_mid_lut, m_mbits, m_erange, m_mid_mbits,
                    m_mid_erange, m_nlev, m_salt, block, index, mask, mask_b, block_size, M_BITS, M_SIGNED, M_STOCH,
                    M_BF16, BPP, BSP2)  # fmt: skip
    elif M_MODE == 2:
        upd = tl.load(m_ptr + index, mask=mask, other=0.0) * beta1 + one_minus_beta1 * upd
        tl.store(m_ptr + index, upd, mask=mask)
    if WD:
        p = p - p * tl.load(scalars + 1 + zero)
    tl.store(p_ptr + index, p - upd, mask=mask)


def _check(p, g, row, col) -> None:
    for name, t in (("p", p), ("g", g), ("row", row), ("col", col)):
        check_device(name, t)
    if p.dtype != torch.float32 or p.dim() != 2 or not p.is_contiguous():
        raise ValueError("p must be a contiguous fp32 matrix")
    if g.shape != p.shape or g.dtype not in _G_DTYPES:
        raise ValueError("g must be fp32/bf16/fp16 with p's shape")
    R, C = p.shape
    if row.dtype != torch.float32 or not row.is_contiguous() or row.numel() != R:
        raise ValueError("row must be contiguous fp32 (R,)")
    if col.dtype != torch.float32 or not col.is_contiguous() or col.numel() != C:
        raise ValueError("col must be contiguous fp32 (C,)")


def _first_moment(p, m_dense, m_quantized, salt: int) -> tuple[dict, dict, int]:
    """Runtime args, constexprs and block size of the apply kernel's first moment (none, dense, quantized)."""
    n = p.numel()
    if m_quantized is not None:
        codes, scales, tables, geometry, signed, bits, stochastic, block_size = m_quantized
        check_block_size(block_size, (bits,))
        check_codes("m", codes, scales, n, bits, block_size)
        run, const = map_args("m", tables, geometry, signed, bits, p.device)
        view, bf16 = scales_view(scales)
        run.update(m_ptr=codes, m_scales=view, m_salt=salt_i32(salt))
        const.update(M_MODE=QUANTIZED_M, M_STOCH=bool(stochastic), M_BF16=bf16)
        return run, const, block_size
    unused = dict(m_levels=p, m_lut=p, m_mids=p, m_mid_lut=p, m_mbits=0, m_erange=0, m_mid_mbits=0,
                  m_mid_erange=0, m_nlev=1, m_salt=0, m_scales=p)  # fmt: skip
    const = dict(M_BITS=8, M_SIGNED=True, M_STOCH=False, M_BF16=False)
    if m_dense is not None:
        check_device("m", m_dense)
        if m_dense.dtype != torch.float32 or m_dense.shape != p.shape or not m_dense.is_contiguous():
            raise ValueError("a dense first moment must be contiguous fp32 of p's shape")
        return {**unused, "m_ptr": m_dense}, {**const, "M_MODE": DENSE_M}, APPLY_BLOCK
    return {**unused, "m_ptr": p}, {**const, "M_MODE": NO_M}, APPLY_BLOCK


def adafactor_factored_step(p, g, row, col, v_eps, hp: AdafactorScalars, *, m_dense=None, m_quantized=None) -> None:
    """One Adafactor step of the (R, C) fp32 matrix ``p`` (``adafactor_order``'s arithmetic), in place.

    Args:
        p: contiguous fp32 (R, C) parameter. g: its gradient (fp32/bf16/fp16, p's shape; a strided one is
            copied). row, col: fp32 (R,) / (C,) row and column means of the second moment (replaced).
        v_eps: the factored codec's floor of ``mean(row)``.
        hp: the step's host numbers (``adafactor_order.AdafactorScalars``).
        m_dense: the first moment as a contiguous fp32 tensor of p's shape, or None (default).
        m_quantized: the first moment block-quantized, ``(codes, scales, tables, geometry, signed, bits,
            stochastic, block_size)`` (as ``adamw_quantized_step``'s m arguments; the salt is ``hp.m_salt``),
            or None (default). At most one of the two, and one exactly when ``hp.beta1`` is set.
    """
    _check(p, g, row, col)
    if (hp.beta1 is None) != (m_dense is None and m_quantized is None) or (m_dense is not None and m_quantized is not None):
        raise ValueError("give one first moment (m_dense or m_quantized) exactly when beta1 is set")
    R, C = p.shape
    m_run, m_const, block_size = _first_moment(p, m_dense, m_quantized, hp.m_salt)
    if R * C == 0:
        return
    g = g.contiguous()
    c, dev = hp.fp32(), p.device
    chunks, tiles = triton.cdiv(R, ROWS), triton.cdiv(C, COLS)
    f64 = dict(dtype=torch.float64, device=dev)
    row_part, col_part = torch.empty(R * tiles, **f64), torch.empty(chunks * C, **f64)
    p_part, u_part = torch.empty(chunks * tiles, **f64), torch.empty(chunks * tiles, **f64)
    msq_row, msq_col = torch.empty(R, dtype=torch.float32, device=dev), torch.empty(C, dtype=torch.float32, device=dev)
    a, b = torch.empty_like(msq_row), torch.empty_like(msq_col)
    scalars = torch.empty(2, dtype=torch.float32, device=dev)
    tile = dict(M=ROWS, N=COLS, LOG_M=ROWS.bit_length() - 1, LOG_N=COLS.bit_length() - 1)
    vec = dict(TILE=VEC_TILE, LOG_TILE=VEC_TILE.bit_length() - 1)
    g_dtype = _G_DTYPES[g.dtype]
    launch(_stats_kernel, (chunks, tiles), dict(p_ptr=p, g_ptr=g, row_part=row_part, col_part=col_part,
           p_part=p_part, R=R, C=C, num_tiles=tiles, eps1=float(c["eps1"])),
           dict(G_DTYPE=g_dtype, SCALE_P=bool(hp.scale_parameter), **tile), ROWS * COLS)  # fmt: skip
    launch(row_col_means_kernel, (triton.cdiv(max(R, C), VEC_TILE),), dict(row=msq_row, col=msq_col,
           row_part=row_part, col_part=col_part, R=R, C=C, num_tiles=tiles, num_chunks=chunks),
           dict(TILE=VEC_TILE), VEC_TILE)  # fmt: skip
    launch(_vector_kernel, (1,), dict(row=row, col=col, new_row=msq_row, new_col=msq_col, a_out=a, b_out=b, R=R,
           C=C, beta2t=float(c["beta2t"]), one_minus=float(c["one_minus"]), v_eps=float(np.float32(v_eps))),
           vec, VEC_TILE)  # fmt: skip
    launch(_update_sq_kernel, (chunks, tiles), dict(g_ptr=g, a_ptr=a, b_ptr=b, u_part=u_part, R=R, C=C,
           num_tiles=tiles), dict(G_DTYPE=g_dtype, **tile), ROWS * COLS)  # fmt: skip
    hyper = torch.tensor(hp.hyper(R * C), dtype=torch.float64).to(dev)
    launch(_scalars_kernel, (1,), dict(u_part=u_part, p_part=p_part, hyper=hyper, out=scalars,
           num_parts=chunks * tiles), dict(SCALE_P=bool(hp.scale_parameter), **vec), VEC_TILE)  # fmt: skip
    bpp, bsp2 = tile_shape(block_size)
    launch(_apply_kernel, (triton.cdiv(triton.cdiv(R * C, block_size), bpp),),
           dict(p_ptr=p, g_ptr=g, a_ptr=a, b_ptr=b, scalars=scalars, **m_run, numel=R * C, C=C,
                block_size=block_size, beta1=float(c["beta1"]), one_minus_beta1=float(c["one_minus_beta1"])),
           dict(G_DTYPE=g_dtype, **m_const, WD=bool(hp.weight_decay), BPP=bpp, BSP2=bsp2), bpp * bsp2)  # fmt: skip
