"""Building blocks of the Triton kernels: the block quantizer's exact arithmetic and the launch plumbing.

Every helper here reproduces, operation for operation, the C++ CPU kernel (``cpu_adamw.cpp``) and the PyTorch
reference (``quant/blockwise.py``, ``quant/maps.py``, ``quant/rounding.py``), so that the Triton kernels store
the same codes, scales and parameters bit for bit:

- decoding is ``levels[code] * scale`` (one fp32 multiply);
- a block's scale is the largest ``|x|`` taken on the bit patterns (an integer max), stored as fp32 or as
  bfloat16 rounded *up* (clamped to the largest finite bf16);
- encoding multiplies by the fp32 reciprocal of the scale (0 for an all-zero block), clamps to the map's
  range (comparisons, so a NaN stays NaN as in the C++ kernel), turns -0.0 into +0.0 and finds the code
  through the map's bucket tables (exactly ``searchsorted``: see ``quant/maps.py``): nearest = number of
  fp32 midpoints <= u, stochastic = floor index, then up with probability (u - lower) / gap, drawn from the
  counter hash ``fmix32(i * 0x9E3779B9 + salt) >> 8`` / 2**24 of the element's flat index ``i``;
- 4-bit codes are packed two per byte, element 2k in the low nibble; an odd tail pads the high nibble with 0.

Floating-point rules: kernels are launched with ``enable_fp_fusion=False`` (no multiply-add contraction,
as the C++ kernel's ``-ffp-contract=off``), divisions and square roots use the IEEE-rounded ``div_rn`` and
``sqrt_rn`` (Triton's ``/`` and ``sqrt`` are approximate on NVIDIA GPUs), and a fused multiply-add is
written as ``tl.fma`` only where the reference itself uses one (torch's CPU ``lerp`` and ``add(alpha=)``).

Work layout: a program owns ``BPP`` consecutive quantization blocks of one tensor, held as a 2-D tile
``[BPP, BSP2]`` (``BSP2`` = the block size rounded up to a power of two; the padding is masked), so the
block maxima are row reductions and any block size works, odd ones included (8 bits).
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch
import triton
import triton.language as tl

GOLDEN = 0x9E3779B9
TILE_ELEMENTS = 2048  # elements a program holds at once (quantization blocks x padded block size)
_TABLE_CACHE: OrderedDict = OrderedDict()  # (id(table), device) -> (table, its device copy)
_TABLE_CACHE_SIZE = 256


def interpreting() -> bool:
    """Whether Triton runs its CPU interpreter (``TRITON_INTERPRET=1``): kernels then take CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def kernel_device_ok(t: torch.Tensor) -> bool:
    """Whether the kernels can run on ``t``'s device: CUDA when compiled, CPU under the interpreter."""
    return t.device.type == ("cpu" if interpreting() else "cuda")


def check_device(name: str, t: torch.Tensor) -> None:
    """``ValueError`` naming ``name`` unless ``t`` is a plain tensor the kernels can run on."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        raise ValueError(f"{name} must be a plain torch.Tensor, got {type(t).__name__}")
    if not kernel_device_ok(t):
        where = "CPU tensors (TRITON_INTERPRET=1)" if interpreting() else "CUDA tensors"
        raise ValueError(f"{name} is on {t.device}; the Triton kernels take {where}")


def tile_shape(block_size: int) -> tuple[int, int]:
    """``(BPP, BSP2)``: quantization blocks per program and the block size padded to a power of two."""
    padded = max(2, triton.next_power_of_2(block_size))
    return max(1, TILE_ELEMENTS // padded), padded


def num_warps_for(tile: int) -> int:
    """Warps per program for a tile of ``tile`` elements (4 up to 2048 elements, 8 above)."""
    return 4 if tile <= 2048 else 8


def launch(kernel, grid, args: dict, constants: dict, tile: int) -> None:
    """Launch ``kernel`` on ``grid`` with keyword ``args`` and constexpr ``constants``, IEEE arithmetic
    (no contraction) and ``num_warps_for(tile)`` warps; when ``RECORDER`` is set it gets the launch instead
    (``triton_compile.capture``)."""
    if RECORDER is not None:
        RECORDER(kernel, grid, args, constants, tile)
        return
    kernel[grid](**args, **constants, num_warps=num_warps_for(tile), enable_fp_fusion=False)


RECORDER = None  # a callable(kernel, grid, args, constants, tile) that takes launches instead of running them


def f32(x: float) -> float:
    """``x`` rounded to float32 (as the C++ kernel's ``static_cast<float>``), returned as a Python float."""
    return float(torch.tensor(float(x), dtype=torch.float32))


def f32_op(op: str, a: float, b: float) -> float:
    """One float32 operation ``a op b`` (``+ - * /``) on float32 values, rounded once as in C++."""
    ta, tb = torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)
    out = {"+": torch.add, "-": torch.sub, "*": torch.mul, "/": torch.div}[op](ta, tb)
    return float(out)


def salt_i32(salt: int) -> int:
    """A 32-bit salt as the signed int32 with the same bits (kernels reinterpret it as uint32)."""
    s = int(salt) & 0xFFFFFFFF
    return s - (1 << 32) if s >= 1 << 31 else s


def scales_view(scales: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Scales as the kernels address them: fp32 as is, bfloat16 as its int16 bit patterns; and whether bf16."""
    if scales.dtype == torch.bfloat16:
        return scales.view(torch.int16), True
    if scales.dtype != torch.float32:
        raise ValueError(f"scales must be float32 or bfloat16, got {scales.dtype}")
    return scales, False


def device_table(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` (contiguous), cached per source tensor: a map's tables are copied to the GPU once.

    The cache keeps the source tensor alive, so its id cannot be reused by another table while cached."""
    if t.device == device and t.is_contiguous():
        return t
    key = (id(t), str(device))
    hit = _TABLE_CACHE.get(key)
    if hit is not None and hit[0] is t:
        _TABLE_CACHE.move_to_end(key)
        return hit[1]
    copy = t.contiguous().to(device)
    _TABLE_CACHE[key] = (t, copy)
    if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        _TABLE_CACHE.popitem(last=False)
    return copy


def map_args(
    prefix: str, tables, geometry, is_signed: bool, bits: int, device: torch.device
) -> tuple[dict, dict]:
    """Kernel arguments of one quantization map: the four tables on ``device``, the bucket geometry and the
    level count (runtime) and the width and signedness (compile-time), named ``{prefix}_...``.

    Args:
        prefix: the state's prefix in the kernel signature (``m``, ``v``, ``x``).
        tables: ``[levels, lut, midpoints, mid_lut]`` of a ``QuantMap`` (as the CPU kernel takes them).
        geometry: ``[lut_mantissa_bits, lut_exp_range, mid_mantissa_bits, mid_exp_range]``.
        is_signed: whether the map covers negative values.
        bits: 4 or 8.
        device: where the kernel runs.
    """
    if len(tables) != 4 or len(geometry) != 4:
        raise ValueError(f"{prefix}: expects tables (levels, lut, midpoints, mid_lut) and geometry "
                         "(mant, exp, mid_mant, mid_exp)")  # fmt: skip
    if bits not in (4, 8):
        raise ValueError(f"{prefix}_bits must be 4 or 8, got {bits!r}")
    levels, lut, mids, mid_lut = (device_table(t, device) for t in tables)
    if levels.dtype != torch.float32 or mids.dtype != torch.float32 or mids.numel() != levels.numel():
        raise ValueError(
            f"{prefix}: levels and midpoints must be fp32, one midpoint per level (the last +inf)"
        )
    if lut.dtype != torch.int32 or mid_lut.dtype != torch.int32:
        raise ValueError(f"{prefix}: bucket tables must be int32")
    halves = 2 if is_signed else 1
    mbits, erange, mid_mbits, mid_erange = (int(x) for x in geometry)
    if (
        lut.numel() != ((erange + 1) << mbits) * halves
        or mid_lut.numel() != ((mid_erange + 1) << mid_mbits) * halves
    ):
        raise ValueError(f"{prefix}: bucket table size does not match its geometry")
    if levels.numel() > 2**bits:
        raise ValueError(f"{prefix}: {levels.numel()} levels do not fit in {bits} bits")
    runtime = {f"{prefix}_levels": levels, f"{prefix}_lut": lut, f"{prefix}_mids": mids, f"{prefix}_mid_lut": mid_lut,
               f"{prefix}_mbits": mbits, f"{prefix}_erange": erange, f"{prefix}_mid_mbits": mid_mbits,
               f"{prefix}_mid_erange": mid_erange, f"{prefix}_nlev": levels.numel()}  # fmt: skip
    constants = {f"{prefix.upper()}_BITS": bits, f"{prefix.upper()}_SIGNED": bool(is_signed)}
    return runtime, constants


def check_codes(
    name: str, codes: torch.Tensor, scales: torch.Tensor, numel: int, bits: int, block_size: int
) -> None:
    """``ValueError`` unless ``codes``/``scales`` are contiguous uint8 / (fp32|bf16) of the sizes ``numel``
    elements at ``bits`` bits in blocks of ``block_size`` need."""
    if codes.dtype != torch.uint8 or not codes.is_contiguous():
        raise ValueError(f"{name} codes must be contiguous uint8")
    if not scales.is_contiguous() or scales.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"{name} scales must be contiguous fp32 or bf16")
    if codes.numel() != (numel if bits == 8 else (numel + 1) // 2):
        raise ValueError(f"{name} codes: {codes.numel()} bytes for {numel} elements at {bits} bits")
    if scales.numel() != (numel + block_size - 1) // block_size:
        raise ValueError(f"{name} scales: {scales.numel()} for {numel} elements in blocks of {block_size}")


def check_block_size(block_size: int, bits: tuple[int, ...]) -> None:
    """``ValueError`` unless ``block_size`` is an integer >= 2, even when any state is 4-bit."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block_size must be an integer >= 2, got {block_size!r}")
    if 4 in bits and block_size % 2:
        raise ValueError(f"block_size must be even for 4-bit codes (two per byte), got {block_size}")


# ------------------------------------------------------------------------------------------ device code


@triton.jit
def reduce_max(x, axis: tl.constexpr, keep_dims: tl.constexpr = False):
    """``tl.max`` written as ``tl.reduce`` with the library's combine function: the same reduction when
    compiled, and the interpreter recognizes that function (a NumPy reduction) even when Triton was imported
    before ``TRITON_INTERPRET`` was set (e.g. by torch), when ``tl.max`` itself cannot run interpreted."""
    return tl.reduce(x, axis, tl.standard._elementwise_max, keep_dims=keep_dims)


@triton.jit
def reduce_sum(x, axis: tl.constexpr, keep_dims: tl.constexpr = False):
    """``tl.sum`` as ``tl.reduce`` (see ``reduce_max``); sums in the input's dtype, in a tree order."""
    return tl.reduce(x, axis, tl.standard._sum_combine, keep_dims=keep_dims)


@triton.jit
def fmix32(h):
    """MurmurHash3's 32-bit finalizer on uint32 values (wrapping multiplies)."""
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def uniform_from_hash(index, salt):
    """Uniform fp32 numbers in [0, 1) of element ``index`` (int64, taken mod 2**32) and int32 ``salt``."""
    h = index.to(tl.uint32) * 0x9E3779B9 + salt.to(tl.uint32, bitcast=True)
    return (fmix32(h) >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def bucket_key(u, mbits, erange, SIGNED: tl.constexpr):
    """Bucket-table index of fp32 ``u``: sign | exponent clamped to the table's window | top mantissa bits."""
    bits = u.to(tl.uint32, bitcast=True)
    e = ((bits >> 23) & 0xFF).to(tl.int32) - (127 - erange)
    mant = ((bits & 0x7FFFFF) >> (23 - mbits).to(tl.uint32)).to(tl.int32)
    mant = tl.where(e < 0, 0, mant)
    e = tl.where(e < 0, 0, e)
    e = tl.where(e > erange, erange, e)  # only a NaN gets here; keeps the read inside the table
    key = (e << mbits) + mant
    if SIGNED:
        key += (bits >> 31).to(tl.int32) * ((erange + 1) << mbits)
    return key


@triton.jit
def encode_values(
    x,
    inv,
    index,
    salt,
    levels,
    lut,
    mids,
    mid_lut,
    mbits,
    erange,
    mid_mbits,
    mid_erange,
    nlev,
    SIGNED: tl.constexpr,
    STOCHASTIC: tl.constexpr,
):
    """Codes (int32) of ``x * inv`` on a map: nearest (ties up) or stochastic with the counter hash."""
    lo_level = tl.load(levels)
    hi_level = tl.load(levels + nlev - 1)
    u = x * inv
    u = tl.where(u < lo_level, lo_level, u)
    u = tl.where(u > hi_level, hi_level, u)
    u = tl.where(u == 0.0, 0.0, u)  # -0.0 -> +0.0 (the sign bit would pick the negative bucket half)
    if STOCHASTIC:
        lo = tl.load(lut + bucket_key(u, mbits, erange, SIGNED))
        nxt = tl.minimum(lo + 1, nlev - 1)
        lo = tl.where(tl.load(levels + nxt) <= u, nxt, lo)
        hi = tl.minimum(lo + 1, nlev - 1)
        lev_lo = tl.load(levels + lo)
        below = u - lev_lo
        gap = tl.load(levels + hi) - lev_lo
        r = uniform_from_hash(index, salt)
        code = tl.where(r * gap < below, hi, lo)
    else:
        cnt = tl.load(mid_lut + bucket_key(u, mid_mbits, mid_erange, SIGNED))
        code = cnt + (tl.load(mids + cnt) <= u).to(tl.int32)
    return code


@triton.jit
def load_scales(scales, block, mask_b, BF16: tl.constexpr):
    """fp32 scales of the blocks ``block`` (bf16 scales are stored as int16 bit patterns)."""
    if BF16:
        raw = tl.load(scales + block, mask=mask_b, other=0)
        return (raw.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(scales + block, mask=mask_b, other=0.0)


@triton.jit
def store_scales(scales, block, absmax_bits, mask_b, BF16: tl.constexpr):
    """Store the block maxima (uint32 bit patterns) as scales; returns the fp32 scale each block encodes with."""
    if BF16:
        up = (absmax_bits + 0xFFFF) & 0xFFFF0000
        up = tl.where(up > 0x7F7F0000, 0x7F7F0000, up)
        tl.store(scales + block, (up >> 16).to(tl.uint16).to(tl.int16, bitcast=True), mask=mask_b)
        return up.to(tl.float32, bitcast=True)
    else:
        scale = absmax_bits.to(tl.float32, bitcast=True)
        tl.store(scales + block, scale, mask=mask_b)
        return scale


@triton.jit
def decode_tile(codes, scales, levels, block, index, mask, mask_b, BITS: tl.constexpr, BF16: tl.constexpr):
    """fp32 values of the elements ``index`` ([BPP, BSP2]) in blocks ``block`` ([BPP, 1])."""
    if BITS == 8:
        code = tl.load(codes + index, mask=mask, other=0).to(tl.int32)
    else:
        byte = tl.load(codes + (index >> 1), mask=mask, other=0).to(tl.int32)
        code = (byte >> ((index & 1) * 4).to(tl.int32)) & 0xF
    return tl.load(levels + code) * load_scales(scales, block, mask_b, BF16)


@triton.jit
def encode_tile(
    x,
    codes,
    scales,
    levels,
    lut,
    mids,
    mid_lut,
    mbits,
    erange,
    mid_mbits,
    mid_erange,
    nlev,
    salt,
    block,
    index,
    mask,
    mask_b,
    block_size,
    BITS: tl.constexpr,
    SIGNED: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    BF16: tl.constexpr,
    BPP: tl.constexpr,
    BSP2: tl.constexpr,
):
    """Quantize the tile ``x`` ([BPP, BSP2], masked lanes ignored): store each block's scale and codes."""
    absmax = reduce_max(tl.where(mask, x.to(tl.uint32, bitcast=True) & 0x7FFFFFFF, 0), 1)
    scale = store_scales(scales, block, absmax[:, None], mask_b, BF16)
    positive = scale > 0.0
    inv = tl.where(
        positive, tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), tl.where(positive, scale, 1.0)), 0.0
    )
    code = encode_values(
        x,
        inv,
        index,
        salt,
        levels,
        lut,
        mids,
        mid_lut,
        mbits,
        erange,
        mid_mbits,
        mid_erange,
        nlev,
        SIGNED,
        STOCHASTIC,
    )
    if BITS == 8:
        tl.store(codes + index, code.to(tl.uint8), mask=mask)
    else:  # pairs of lanes -> one byte; a masked high lane (odd tail) packs as 0
        code = tl.where(mask, code, 0)
        lo, hi = tl.split(tl.reshape(code, [BPP, BSP2 // 2, 2]))
        pair = tl.arange(0, BSP2 // 2)[None, :]
        first = block.to(tl.int64) * block_size + 2 * pair
        byte_mask = tl.reshape(mask, [BPP, BSP2 // 2, 2])
        lo_mask, _ = tl.split(byte_mask)
        tl.store(codes + (first >> 1), (lo | (hi << 4)).to(tl.uint8), mask=lo_mask)


@triton.jit
def tile_indices(first_block, numel, block_size, BPP: tl.constexpr, BSP2: tl.constexpr):
    """Blocks ``[BPP, 1]``, flat element indices ``[BPP, BSP2]`` (int64) and masks of one program's tile."""
    nblocks = (numel + block_size - 1) // block_size
    block = first_block + tl.arange(0, BPP)[:, None]
    col = tl.arange(0, BSP2)[None, :]
    index = block.to(tl.int64) * block_size + col
    mask_b = block < nblocks
    mask = mask_b & (col < block_size) & (index < numel)
    return block, index, mask, mask_b


@triton.jit(do_not_specialize=["R", "C", "num_tiles", "num_chunks"])
def row_col_means_kernel(row, col, row_part, col_part, R, C, num_tiles, num_chunks, TILE: tl.constexpr):
    """Row means (each row's ``num_tiles`` partial sums added in tile order) and column means (each column's
    ``num_chunks`` partial sums added in chunk order), float64 divided by the row length / column height and
    rounded to fp32 into ``row`` (R) and ``col`` (C). Shared by HybridAdam's and Adafactor's factored steps."""
    k = tl.program_id(0) * TILE + tl.arange(0, TILE)
    rows = k < R
    acc = tl.full([TILE], 0, tl.float64)
    for t in range(num_tiles):
        acc += tl.load(row_part + k.to(tl.int64) * num_tiles + t, mask=rows, other=0.0)
    tl.store(row + k, (acc / C.to(tl.float64)).to(tl.float32), mask=rows)
    cols = k < C
    acc = tl.full([TILE], 0, tl.float64)
    part = col_part + k.to(tl.int64)
    for _ in range(num_chunks):
        acc += tl.load(part, mask=cols, other=0.0)
        part += C
    tl.store(col + k, (acc / R.to(tl.float64)).to(tl.float32), mask=cols)
