"""Fused AdamW step with block-quantized moments, in Triton (CUDA; the CPU under ``TRITON_INTERPRET=1``).

``adamw_quantized_step`` has the CPU kernel's argument list (``cpu_adamw.cpp``) and its arithmetic, operation
for operation (``m + (1 - b1)(g - m)``, ``v b2 + (1 - b2) g^2``, ``sqrt(v) / sqrt(bc2) + eps`` as a multiply by
the fp32 reciprocal, ``p decay - step_size (m / denom)``, no contraction, IEEE division and square root), so
it stores the same parameters, codes and scales bit for bit. One program reads each input once and writes
each output once: parameter, gradient, both moments' codes and scales.

``adamw_quantized_multi_step`` steps many parameters in one launch: a table of their addresses and sizes and
a work table (tensor, first block) per program, so hundreds of small tensors do not pay a launch each.

``triton_kernels()`` returns the namespace of every Triton entry point (this module's, the quantizer's, the
factored and per-rule kernels), or None when Triton cannot run here. Importing this module needs Triton
(``ImportError`` otherwise: the dispatch table then has no CUDA provider).
"""

from __future__ import annotations

import types
from functools import lru_cache

import numpy as np
import torch
import triton
import triton.language as tl

from .triton_common import (
    check_block_size,
    check_codes,
    check_device,
    decode_tile,
    encode_tile,
    interpreting,
    launch,
    map_args,
    salt_i32,
    scales_view,
    tile_indices,
    tile_shape,
)


@triton.jit
def adamw_math(p, g, m, v, decay, omb1, beta2, omb2, eps, step_size, inv_sqrt_bc2):
    """The CPU kernel's ``adamw_update`` on fp32 tiles: returns the new (p, m, v)."""
    m = m + omb1 * (g - m)
    v = v * beta2 + omb2 * (g * g)
    denom = tl.sqrt_rn(v) * inv_sqrt_bc2 + eps
    p = p * decay - step_size * tl.math.div_rn(m, denom)
    return p, m, v


@triton.jit(do_not_specialize=["m_salt", "v_salt", "numel", "block_size", "num_tensors"])
def _adamw_quantized_kernel(
    p_ptr, g_ptr, m_codes, m_scales, v_codes, v_scales,
    m_levels, m_lut, m_mids, m_mid_lut, m_mbits, m_erange, m_mid_mbits, m_mid_erange, m_nlev,
    v_levels, v_lut, v_mids, v_mid_lut, v_mbits, v_erange, v_mid_mbits, v_mid_erange, v_nlev,
    m_salt, v_salt, numel, step_size, inv_sqrt_bc2, table, found_inf,
    block_size, decay, omb1, beta2, omb2, eps, num_tensors,
    M_BITS: tl.constexpr, M_SIGNED: tl.constexpr, V_BITS: tl.constexpr, V_SIGNED: tl.constexpr,
    M_STOCH: tl.constexpr, V_STOCH: tl.constexpr, M_BF16: tl.constexpr, V_BF16: tl.constexpr,
    G_DTYPE: tl.constexpr, MULTI: tl.constexpr, HAS_FLAG: tl.constexpr, BPP: tl.constexpr, BSP2: tl.constexpr,
):  # fmt: skip
    if MULTI:  # table (int64): 6 pointer rows, numel, m/v salts, step sizes and 1/sqrt(bc2) as fp32 bits
        T = num_tensors
        t = tl.load(table + 11 * T + 2 * tl.program_id(0))
        first_block = tl.load(table + 11 * T + 2 * tl.program_id(0) + 1).to(tl.int32)
        p_ptr = tl.load(table + t).to(tl.pointer_type(tl.float32))
        g_ptr = tl.load(table + T + t).to(tl.pointer_type(G_DTYPE))
        m_codes = tl.load(table + 2 * T + t).to(tl.pointer_type(tl.uint8))
        v_codes = tl.load(table + 4 * T + t).to(tl.pointer_type(tl.uint8))
        if M_BF16:
            m_scales = tl.load(table + 3 * T + t).to(tl.pointer_type(tl.int16))
        else:
            m_scales = tl.load(table + 3 * T + t).to(tl.pointer_type(tl.float32))
        if V_BF16:
            v_scales = tl.load(table + 5 * T + t).to(tl.pointer_type(tl.int16))
        else:
            v_scales = tl.load(table + 5 * T + t).to(tl.pointer_type(tl.float32))
        numel = tl.load(table + 6 * T + t)
        m_salt = tl.load(table + 7 * T + t).to(tl.int32)
        v_salt = tl.load(table + 8 * T + t).to(tl.int32)
        step_size = tl.load(table + 9 * T + t).to(tl.int32).to(tl.float32, bitcast=True)
        inv_sqrt_bc2 = tl.load(table + 10 * T + t).to(tl.int32).to(tl.float32, bitcast=True)
    else:
        first_block = tl.program_id(0) * BPP
    block, index, mask, mask_b = tile_indices(first_block, numel, block_size, BPP, BSP2)
    if HAS_FLAG:  # a non-finite gradient somewhere in this step: nothing is written
        go = tl.load(found_inf + tl.full([1, 1], 0, tl.int32)) == 0  # [1, 1]: see triton_factored
        mask = mask & go
        mask_b = mask_b & go
    p = tl.load(p_ptr + index, mask=mask, other=0.0)
    g = tl.load(g_ptr + index, mask=mask, other=0.0).to(tl.float32)
    m = decode_tile(m_codes, m_scales, m_levels, block, index, mask, mask_b, M_BITS, M_BF16)
    v = decode_tile(v_codes, v_scales, v_levels, block, index, mask, mask_b, V_BITS, V_BF16)
    p, m, v = adamw_math(p, g, m, v, decay, omb1, beta2, omb2, eps, step_size, inv_sqrt_bc2)
    tl.store(p_ptr + index, p, mask=mask)
    encode_tile(m, m_codes, m_scales, m_levels, m_lut, m_mids, m_mid_lut, m_mbits, m_erange, m_mid_mbits,
                m_mid_erange, m_nlev, m_salt, block, index, mask, mask_b, block_size, M_BITS, M_SIGNED, M_STOCH,
                M_BF16, BPP, BSP2)  # fmt: skip
    encode_tile(v, v_codes, v_scales, v_levels, v_lut, v_mids, v_mid_lut, v_mbits, v_erange, v_mid_mbits,
                v_mid_erange, v_nlev, v_salt, block, index, mask, mask_b, block_size, V_BITS, V_SIGNED, V_STOCH,
                V_BF16, BPP, BSP2)  # fmt: skip


_G_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def adam_scalars(lr, beta1, beta2, eps, weight_decay) -> dict:
    """The fp32 constants of the CPU kernel, computed with its roundings: ``decay = 1 - lr * wd``,
    ``1 - beta1``, ``beta2``, ``1 - beta2``, ``eps`` (every operation in float32)."""
    one = np.float32(1.0)
    lr32, b1, b2 = np.float32(lr), np.float32(beta1), np.float32(beta2)
    return dict(decay=float(one - lr32 * np.float32(weight_decay)), omb1=float(one - b1), beta2=float(b2),
                omb2=float(one - b2), eps=float(np.float32(eps)))  # fmt: skip


def inverse_sqrt_bc2(sqrt_bc2: float) -> float:
    """``1.0f / (float) sqrt_bc2``, as the CPU kernel computes it."""
    return float(np.float32(1.0) / np.float32(sqrt_bc2))


def _state_constants(prefix: str, stochastic: bool, bf16: bool) -> dict:
    p = prefix.upper()
    return {f"{p}_STOCH": bool(stochastic), f"{p}_BF16": bf16}


def _check_flag(found_inf) -> None:
    if found_inf is not None:
        check_device("found_inf", found_inf)
        if found_inf.dtype != torch.int32 or found_inf.numel() != 1:
            raise ValueError("found_inf must be an int32 tensor of one element")


def adamw_quantized_step(
    p,
    g,
    m_codes,
    m_scales,
    m_tables,
    m_geometry,
    m_signed,
    m_bits,
    m_stochastic,
    m_salt,
    v_codes,
    v_scales,
    v_tables,
    v_geometry,
    v_signed,
    v_bits,
    v_stochastic,
    v_salt,
    block_size,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    step_size,
    sqrt_bc2,
    *,
    found_inf=None,
) -> None:
    """One fused AdamW step of parameter ``p`` whose moments are block-quantized (in place).

    Args:
        p: fp32 parameter (updated in place; a strided one steps on a contiguous copy written back).
        g: its gradient, fp32, bf16 or fp16 (read in fp32; need not be contiguous).
        m_codes, m_scales, v_codes, v_scales: each moment's uint8 codes and fp32/bf16 block scales (written).
        m_tables, m_geometry, m_signed, m_bits: m's map tables ``[levels, lut, midpoints, mid_lut]``, bucket
            geometry, signedness and width (4 or 8); ``v_*`` the same for v.
        m_stochastic, m_salt, v_stochastic, v_salt: rounding mode and 32-bit salt of each moment.
        block_size: elements per quantization block of both moments (>= 2; even if either is 4-bit).
        lr, beta1, beta2, eps, weight_decay: AdamW hyperparameters.
        step_size: ``lr / (1 - beta1**step)``. sqrt_bc2: ``sqrt(1 - beta2**step)``.
        found_inf: optional int32 device flag (see ``triton_quant.nonfinite_flag``): when nonzero at run
            time nothing is written (the step is skipped without a host sync). Default None.
    """
    check_device("p", p)
    check_device("g", g)
    if p.dtype != torch.float32 or g.dtype not in _G_DTYPES or p.numel() != g.numel():
        raise ValueError("p must be fp32 and g fp32/bf16/fp16 with as many elements")
    check_block_size(block_size, (m_bits, v_bits))
    _check_flag(found_inf)
    n = p.numel()
    check_codes("m", m_codes, m_scales, n, m_bits, block_size)
    check_codes("v", v_codes, v_scales, n, v_bits, block_size)
    if n == 0:
        return
    target = p if p.is_contiguous() else p.contiguous()
    m_run, m_const = map_args("m", m_tables, m_geometry, m_signed, m_bits, p.device)
    v_run, v_const = map_args("v", v_tables, v_geometry, v_signed, v_bits, p.device)
    ms, m_bf16 = scales_view(m_scales)
    vs, v_bf16 = scales_view(v_scales)
    bpp, bsp2 = tile_shape(block_size)
    args = dict(p_ptr=target, g_ptr=g.contiguous(), m_codes=m_codes, m_scales=ms, v_codes=v_codes, v_scales=vs,
                **m_run, **v_run, m_salt=salt_i32(m_salt), v_salt=salt_i32(v_salt), numel=n,
                step_size=float(np.float32(step_size)), inv_sqrt_bc2=inverse_sqrt_bc2(sqrt_bc2),
                table=target, found_inf=found_inf if found_inf is not None else target, block_size=block_size,
                **adam_scalars(lr, beta1, beta2, eps, weight_decay), num_tensors=1)  # fmt: skip
    constants = dict(**m_const, **v_const, **_state_constants("m", m_stochastic, m_bf16),
                     **_state_constants("v", v_stochastic, v_bf16), G_DTYPE=getattr(tl, _G_DTYPES[g.dtype]),
                     MULTI=False, HAS_FLAG=found_inf is not None, BPP=bpp, BSP2=bsp2)  # fmt: skip
    launch(_adamw_quantized_kernel, (triton.cdiv(m_scales.numel(), bpp),), args, constants, bpp * bsp2)
    if target is not p:
        p.copy_(target)


def _f32_bits(x: float) -> int:
    return int(np.array(x, dtype=np.float32).view(np.int32))


def _multi_table(
    params,
    grads,
    m_codes,
    m_scales,
    v_codes,
    v_scales,
    m_salts,
    v_salts,
    step_sizes,
    sqrt_bc2s,
    block_size: int,
    bpp: int,
) -> tuple[torch.Tensor, int, int]:
    """The int64 launch table of a multi-tensor step and ``(table, number of tensors, number of programs)``."""
    keep = [i for i, p in enumerate(params) if p.numel()]
    rows = [[params[i].data_ptr() for i in keep], [grads[i].data_ptr() for i in keep],
            [m_codes[i].data_ptr() for i in keep], [m_scales[i].data_ptr() for i in keep],
            [v_codes[i].data_ptr() for i in keep], [v_scales[i].data_ptr() for i in keep],
            [params[i].numel() for i in keep], [salt_i32(m_salts[i]) for i in keep],
            [salt_i32(v_salts[i]) for i in keep], [_f32_bits(step_sizes[i]) for i in keep],
            [_f32_bits(inverse_sqrt_bc2(sqrt_bc2s[i])) for i in keep]]  # fmt: skip
    work = []
    for t, i in enumerate(keep):
        nblocks = (params[i].numel() + block_size - 1) // block_size
        for first in range(0, nblocks, bpp):
            work += [t, first]
    flat = [x for row in rows for x in row] + work
    return torch.tensor(flat, dtype=torch.int64), len(keep), len(work) // 2


def adamw_quantized_multi_step(
    params,
    grads,
    m_codes,
    m_scales,
    m_tables,
    m_geometry,
    m_signed,
    m_bits,
    m_stochastic,
    m_salts,
    v_codes,
    v_scales,
    v_tables,
    v_geometry,
    v_signed,
    v_bits,
    v_stochastic,
    v_salts,
    block_size,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    step_sizes,
    sqrt_bc2s,
    *,
    found_inf=None,
) -> None:
    """``adamw_quantized_step`` over many parameters in one launch (same maps, widths, rounding modes, scale
    dtype and block size; per-parameter salts and step numbers).

    Args:
        params: contiguous fp32 parameters (updated in place). grads: their gradients (one dtype: fp32, bf16
            or fp16; made contiguous if needed).
        m_codes, m_scales, v_codes, v_scales: lists, one entry per parameter.
        m_salts, v_salts, step_sizes, sqrt_bc2s: lists of per-parameter salts, ``lr / (1 - beta1**step)`` and
            ``sqrt(1 - beta2**step)``.
        Every other argument: as ``adamw_quantized_step`` (shared by all parameters). found_inf: as there.
    """
    lists = (grads, m_codes, m_scales, v_codes, v_scales, m_salts, v_salts, step_sizes, sqrt_bc2s)
    if any(len(x) != len(params) for x in lists):
        raise ValueError(
            "adamw_quantized_multi_step: every per-parameter list must have one entry per parameter"
        )
    if not params:
        return
    check_block_size(block_size, (m_bits, v_bits))
    _check_flag(found_inf)
    grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
    g_dtypes = {g.dtype for g in grads}
    if len(g_dtypes) != 1 or next(iter(g_dtypes)) not in _G_DTYPES:
        raise ValueError(
            f"gradients must share one dtype of fp32/bf16/fp16, got {sorted(map(str, g_dtypes))}"
        )
    scale_dtypes = {s.dtype for s in m_scales}, {s.dtype for s in v_scales}
    if len(scale_dtypes[0]) != 1 or len(scale_dtypes[1]) != 1:
        raise ValueError("the m scales (and the v scales) must share one dtype across parameters")
    for i, (p, g) in enumerate(zip(params, grads)):
        check_device(f"params[{i}]", p)
        check_device(f"grads[{i}]", g)
        if p.dtype != torch.float32 or not p.is_contiguous() or p.numel() != g.numel():
            raise ValueError(f"params[{i}] must be contiguous fp32 with as many elements as its gradient")
        check_codes(f"m[{i}]", m_codes[i], m_scales[i], p.numel(), m_bits, block_size)
        check_codes(f"v[{i}]", v_codes[i], v_scales[i], p.numel(), v_bits, block_size)
    bpp, bsp2 = tile_shape(block_size)
    host, count, programs = _multi_table(params, grads, m_codes, m_scales, v_codes, v_scales, m_salts, v_salts,
                                         step_sizes, sqrt_bc2s, block_size, bpp)  # fmt: skip
    if programs == 0:
        return
    device = params[0].device
    table = host.to(device)
    m_run, m_const = map_args("m", m_tables, m_geometry, m_signed, m_bits, device)
    v_run, v_const = map_args("v", v_tables, v_geometry, v_signed, v_bits, device)
    m_bf16, v_bf16 = scales_view(m_scales[0])[1], scales_view(v_scales[0])[1]
    args = dict(p_ptr=table, g_ptr=table, m_codes=table, m_scales=table, v_codes=table, v_scales=table,
                **m_run, **v_run, m_salt=0, v_salt=0, numel=0, step_size=0.0, inv_sqrt_bc2=0.0, table=table,
                found_inf=found_inf if found_inf is not None else table, block_size=block_size,
                **adam_scalars(lr, beta1, beta2, eps, weight_decay), num_tensors=count)  # fmt: skip
    constants = dict(**m_const, **v_const, **_state_constants("m", m_stochastic, m_bf16),
                     **_state_constants("v", v_stochastic, v_bf16),
                     G_DTYPE=getattr(tl, _G_DTYPES[grads[0].dtype]), MULTI=True, HAS_FLAG=found_inf is not None,
                     BPP=bpp, BSP2=bsp2)  # fmt: skip
    launch(_adamw_quantized_kernel, (programs,), args, constants, bpp * bsp2)
    del table  # the launch is queued on the stream; the caching allocator keeps the memory until it ran


@lru_cache(maxsize=2)
def _namespace(interpret: bool):
    from . import triton_factored, triton_quant, triton_rules

    entries = dict(
        adamw_quantized_step=adamw_quantized_step,
        adamw_quantized_multi_step=adamw_quantized_multi_step,
        adamw_quantized_factored_step=triton_factored.adamw_quantized_factored_step,
        quantize_into=triton_quant.quantize_into,
        dequantize_into=triton_quant.dequantize_into,
        any_nonfinite_f32=triton_quant.any_nonfinite_f32,
        nonfinite_flag=triton_quant.nonfinite_flag,
        lion_quantized_step=triton_rules.lion_quantized_step,
        sgd_quantized_step=triton_rules.sgd_quantized_step,
    )
    return types.SimpleNamespace(device="cpu" if interpret else "cuda", interpreted=interpret, **entries)


def triton_kernels():
    """The Triton entry points as a namespace (attributes named as the CPU kernel's, plus the multi-tensor and
    per-rule ones; ``device`` says which tensors they take), or None when Triton is not installed or there is
    neither a CUDA device nor the interpreter (``TRITON_INTERPRET=1``, which runs them on CPU tensors)."""
    if triton is None:
        return None
    interpret = interpreting()
    if not interpret and not torch.cuda.is_available():
        return None
    return _namespace(interpret)
