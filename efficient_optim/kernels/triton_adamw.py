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
from .triton_master import close_master, open_master, weight_args


@triton.jit
def adamw_math(p, g, m, v, decay, omb1, beta2, omb2, eps, step_size, inv_sqrt_bc2):
    """The CPU kernel's ``adamw_update`` on fp32 tiles: returns the new (p, m, v)."""
    m = m + omb1 * (g - m)
    v = v * beta2 + omb2 * (g * g)
    denom = tl.sqrt_rn(v) * inv_sqrt_bc2 + eps
    p = p * decay - step_size * tl.math.div_rn(m, denom)
    return p, m, v


@triton.jit(do_not_specialize=["m_salt", "v_salt", "w_salt", "numel", "block_size", "num_tensors"])
def _adamw_quantized_kernel(
    p_ptr, g_ptr, m_codes, m_scales, v_codes, v_scales,
    m_levels, m_lut, m_mids, m_mid_lut, m_mbits, m_erange, m_mid_mbits, m_mid_erange, m_nlev,
    v_levels, v_lut, v_mids, v_mid_lut, v_mbits, v_erange, v_mid_mbits, v_mid_erange, v_nlev,
    m_salt, v_salt, numel, step_size, inv_sqrt_bc2, table, found_inf, corr_ptr, w_salt,
    block_size, decay, omb1, beta2, omb2, eps, num_tensors,
    M_BITS: tl.constexpr, M_SIGNED: tl.constexpr, V_BITS: tl.constexpr, V_SIGNED: tl.constexpr,
    M_STOCH: tl.constexpr, V_STOCH: tl.constexpr, M_BF16: tl.constexpr, V_BF16: tl.constexpr,
    G_DTYPE: tl.constexpr, MULTI: tl.constexpr, HAS_FLAG: tl.constexpr, BPP: tl.constexpr, BSP2: tl.constexpr,
    WEIGHT_MODE: tl.constexpr, CORR_BITS: tl.constexpr,
):  # fmt: skip
    if MULTI:  # int64 table rows: 6 pointers, numel, m/v salts, step size and 1/sqrt(bc2) (fp32 bits),
        T = num_tensors  # the weight-correction pointer and weight salt, then (tensor, first block) per program
        t = tl.load(table + 13 * T + 2 * tl.program_id(0))
        first_block = tl.load(table + 13 * T + 2 * tl.program_id(0) + 1).to(tl.int32)
        if WEIGHT_MODE == 0:
            p_ptr = tl.load(table + t).to(tl.pointer_type(tl.float32))
        else:
            p_ptr = tl.load(table + t).to(tl.pointer_type(tl.int16))
        if CORR_BITS == 8:
            corr_ptr = tl.load(table + 11 * T + t).to(tl.pointer_type(tl.int8))
        else:
            corr_ptr = tl.load(table + 11 * T + t).to(tl.pointer_type(tl.int16))
        w_salt = tl.load(table + 12 * T + t).to(tl.int32)
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
    p = open_master(p_ptr, corr_ptr, index, mask, WEIGHT_MODE, CORR_BITS)
    g = tl.load(g_ptr + index, mask=mask, other=0.0).to(tl.float32)
    m = decode_tile(m_codes, m_scales, m_levels, block, index, mask, mask_b, M_BITS, M_BF16)
    v = decode_tile(v_codes, v_scales, v_levels, block, index, mask, mask_b, V_BITS, V_BF16)
    p, m, v = adamw_math(p, g, m, v, decay, omb1, beta2, omb2, eps, step_size, inv_sqrt_bc2)
    close_master(p, p_ptr, corr_ptr, index, mask, w_salt, WEIGHT_MODE, CORR_BITS)
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


def _check_flag(found_inf) -> None:
    if found_inf is not None:
        check_device("found_inf", found_inf)
        if found_inf.dtype != torch.int32 or found_inf.numel() != 1:
            raise ValueError("found_inf must be an int32 tensor of one element")


def _check_pair(name: str, p, g) -> None:
    check_device(name, p)
    check_device(f"gradient of {name}", g)
    if p.dtype not in (torch.float32, torch.bfloat16) or g.dtype not in _G_DTYPES or p.numel() != g.numel():
        raise ValueError(f"{name} must be fp32 or bf16 and its gradient fp32/bf16/fp16 with as many elements")


def _moment_setup(
    m_tables,
    m_geometry,
    m_signed,
    m_bits,
    m_stochastic,
    m_scales,
    v_tables,
    v_geometry,
    v_signed,
    v_bits,
    v_stochastic,
    v_scales,
    device,
    block_size,
    g_dtype,
    found_inf,
    multi,
) -> tuple[dict, dict]:
    """Runtime args and constexprs shared by the single and multi-tensor launches (maps, modes, tile)."""
    m_run, m_const = map_args("m", m_tables, m_geometry, m_signed, m_bits, device)
    v_run, v_const = map_args("v", v_tables, v_geometry, v_signed, v_bits, device)
    bpp, bsp2 = tile_shape(block_size)
    constants = dict(**m_const, **v_const, M_STOCH=bool(m_stochastic), V_STOCH=bool(v_stochastic),
                     M_BF16=scales_view(m_scales)[1], V_BF16=scales_view(v_scales)[1],
                     G_DTYPE=getattr(tl, _G_DTYPES[g_dtype]), MULTI=multi, HAS_FLAG=found_inf is not None,
                     BPP=bpp, BSP2=bsp2)  # fmt: skip
    return {**m_run, **v_run}, constants


def adamw_quantized_step(p, g, m_codes, m_scales, m_tables, m_geometry, m_signed, m_bits, m_stochastic, m_salt,
                         v_codes, v_scales, v_tables, v_geometry, v_signed, v_bits, v_stochastic, v_salt, block_size,
                         lr, beta1, beta2, eps, weight_decay, step_size, sqrt_bc2, *, found_inf=None,
                         weight_correction=None, weight_salt=None) -> None:  # fmt: skip
    """One fused AdamW step of parameter ``p`` whose moments are block-quantized (in place).

    Args:
        p: fp32 parameter, or bf16 with an fp32 master weight (``weight_correction`` or ``weight_salt``);
            updated in place (a strided one steps on a contiguous copy written back).
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
        weight_correction: bf16 ``p`` only: its int8/int16 rounding-residual codes (``correction_bits`` 8/16;
            see ``triton_master``), read and rewritten. Default None.
        weight_salt: bf16 ``p`` only: round the new weight stochastically with this salt. Default None.
    """
    _check_pair("p", p, g)
    check_block_size(block_size, (m_bits, v_bits))
    _check_flag(found_inf)
    n = p.numel()
    check_codes("m", m_codes, m_scales, n, m_bits, block_size)
    check_codes("v", v_codes, v_scales, n, v_bits, block_size)
    target = p if p.is_contiguous() else p.contiguous()
    p_arg, w_args, w_const = weight_args(target, weight_correction, weight_salt)
    if n == 0:
        return
    run, constants = _moment_setup(m_tables, m_geometry, m_signed, m_bits, m_stochastic, m_scales, v_tables,
                                   v_geometry, v_signed, v_bits, v_stochastic, v_scales, p.device, block_size, g.dtype,
                                   found_inf, False)  # fmt: skip
    args = dict(p_ptr=p_arg, g_ptr=g.contiguous(), m_codes=m_codes, m_scales=scales_view(m_scales)[0],
                v_codes=v_codes, v_scales=scales_view(v_scales)[0], **run, m_salt=salt_i32(m_salt),
                v_salt=salt_i32(v_salt), numel=n, step_size=float(np.float32(step_size)),
                inv_sqrt_bc2=inverse_sqrt_bc2(sqrt_bc2), table=p_arg,
                found_inf=found_inf if found_inf is not None else p_arg, **w_args, block_size=block_size,
                **adam_scalars(lr, beta1, beta2, eps, weight_decay), num_tensors=1)  # fmt: skip
    bpp, bsp2 = constants["BPP"], constants["BSP2"]
    launch(
        _adamw_quantized_kernel,
        (triton.cdiv(m_scales.numel(), bpp),),
        args,
        {**constants, **w_const},
        bpp * bsp2,
    )
    if target is not p:
        p.copy_(target)


def _f32_bits(x: float) -> int:
    return int(np.array(x, dtype=np.float32).view(np.int32))


def _multi_table(columns: dict, numels: list, block_size: int, bpp: int) -> tuple[torch.Tensor, int, int]:
    """The int64 launch table of a multi-tensor step: one row per entry of ``columns`` (in the kernel's
    order), then ``(tensor, first block)`` per program; returns ``(table, tensors, programs)``. Empty tensors
    are left out."""
    keep = [i for i, n in enumerate(numels) if n]
    rows = [[column[i] for i in keep] for column in columns.values()]
    work = []
    for t, i in enumerate(keep):
        for first in range(0, (numels[i] + block_size - 1) // block_size, bpp):
            work += [t, first]
    flat = [x for row in rows for x in row] + work
    return torch.tensor(flat, dtype=torch.int64), len(keep), len(work) // 2


def adamw_quantized_multi_step(params, grads, m_codes, m_scales, m_tables, m_geometry, m_signed, m_bits,
                               m_stochastic, m_salts, v_codes, v_scales, v_tables, v_geometry, v_signed, v_bits,
                               v_stochastic, v_salts, block_size, lr, beta1, beta2, eps, weight_decay, step_sizes,
                               sqrt_bc2s, *, found_inf=None, weight_corrections=None, weight_salts=None) -> None:  # fmt: skip
    """``adamw_quantized_step`` over many parameters in one launch (same maps, widths, rounding modes, scale
    dtype, block size and weight mode; per-parameter salts and step numbers).

    Args:
        params: contiguous fp32 parameters, or bf16 ones with ``weight_corrections`` or ``weight_salts``
            (updated in place). grads: their gradients (one dtype: fp32, bf16 or fp16).
        m_codes, m_scales, v_codes, v_scales: lists, one entry per parameter.
        m_salts, v_salts, step_sizes, sqrt_bc2s: lists of per-parameter salts, ``lr / (1 - beta1**step)`` and
            ``sqrt(1 - beta2**step)``.
        weight_corrections, weight_salts: lists for bf16 parameters (see ``adamw_quantized_step``); None.
        Every other argument: as ``adamw_quantized_step`` (shared by all parameters). found_inf: as there.
    """
    k = len(params)
    lists = (grads, m_codes, m_scales, v_codes, v_scales, m_salts, v_salts, step_sizes, sqrt_bc2s)
    if any(len(x) != k for x in lists) or any(
        x is not None and len(x) != k for x in (weight_corrections, weight_salts)
    ):
        raise ValueError(
            "adamw_quantized_multi_step: every per-parameter list must have one entry per parameter"
        )
    if not k:
        return
    check_block_size(block_size, (m_bits, v_bits))
    _check_flag(found_inf)
    grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
    for what, tensors in (
        ("gradients", grads),
        ("parameters", params),
        ("m scales", m_scales),
        ("v scales", v_scales),
    ):
        if len({t.dtype for t in tensors}) != 1:
            raise ValueError(f"adamw_quantized_multi_step: the {what} must share one dtype")
    weights = []
    for i, (p, g) in enumerate(zip(params, grads)):
        _check_pair(f"params[{i}]", p, g)
        if not p.is_contiguous():
            raise ValueError(f"params[{i}] must be contiguous (the multi-tensor step updates it in place)")
        check_codes(f"m[{i}]", m_codes[i], m_scales[i], p.numel(), m_bits, block_size)
        check_codes(f"v[{i}]", v_codes[i], v_scales[i], p.numel(), v_bits, block_size)
        weights.append(weight_args(p, None if weight_corrections is None else weight_corrections[i],
                                   None if weight_salts is None else weight_salts[i]))  # fmt: skip
    run, constants = _moment_setup(m_tables, m_geometry, m_signed, m_bits, m_stochastic, m_scales[0], v_tables,
                                   v_geometry, v_signed, v_bits, v_stochastic, v_scales[0], params[0].device,
                                   block_size, grads[0].dtype, found_inf, True)  # fmt: skip
    columns = {"p": [w[0].data_ptr() for w in weights], "g": [g.data_ptr() for g in grads],
               "mc": [t.data_ptr() for t in m_codes], "ms": [t.data_ptr() for t in m_scales],
               "vc": [t.data_ptr() for t in v_codes], "vs": [t.data_ptr() for t in v_scales],
               "numel": [p.numel() for p in params], "m_salt": [salt_i32(x) for x in m_salts],
               "v_salt": [salt_i32(x) for x in v_salts], "step_size": [_f32_bits(x) for x in step_sizes],
               "inv_sqrt_bc2": [_f32_bits(inverse_sqrt_bc2(x)) for x in sqrt_bc2s],
               "corr": [w[1]["corr_ptr"].data_ptr() for w in weights], "w_salt": [w[1]["w_salt"] for w in weights]}  # fmt: skip
    host, count, programs = _multi_table(columns, columns["numel"], block_size, constants["BPP"])
    if programs == 0:
        return
    table = host.to(params[0].device)
    args = dict(p_ptr=table, g_ptr=table, m_codes=table, m_scales=table, v_codes=table, v_scales=table, **run,
                m_salt=0, v_salt=0, numel=0, step_size=0.0, inv_sqrt_bc2=0.0, table=table,
                found_inf=found_inf if found_inf is not None else table, corr_ptr=table, w_salt=0,
                block_size=block_size, **adam_scalars(lr, beta1, beta2, eps, weight_decay), num_tensors=count)  # fmt: skip
    modes = {(w[2]["WEIGHT_MODE"], w[2]["CORR_BITS"]) for w in weights}
    if len(modes) != 1:
        raise ValueError("adamw_quantized_multi_step: every parameter must use the same weight mode")
    mode, corr_bits = modes.pop()
    launch(_adamw_quantized_kernel, (programs,), args, {**constants, "WEIGHT_MODE": mode, "CORR_BITS": corr_bits},
           constants["BPP"] * constants["BSP2"])  # fmt: skip
    del table  # queued on the stream: the caching allocator keeps the memory until the kernel has run


@lru_cache(maxsize=2)
def _namespace(interpret: bool):
    from . import triton_adafactor, triton_factored, triton_quant, triton_rules

    entries = dict(
        adamw_quantized_step=adamw_quantized_step,
        adamw_quantized_multi_step=adamw_quantized_multi_step,
        adamw_quantized_factored_step=triton_factored.adamw_quantized_factored_step,
        adafactor_factored_step=triton_adafactor.adafactor_factored_step,
        quantize_into=triton_quant.quantize_into,
        dequantize_into=triton_quant.dequantize_into,
        any_nonfinite_f32=triton_quant.any_nonfinite_f32,
        nonfinite_flag=triton_quant.nonfinite_flag,
        lion_quantized_step=triton_rules.lion_quantized_step,
        sgd_quantized_step=triton_rules.sgd_quantized_step,
    )
    # weight_modes: the steps take bf16 parameters with weight_correction= / weight_salt=;
    # odd_blocks: odd block sizes at 8 bits (the C++ step kernels need even ones)
    return types.SimpleNamespace(device="cpu" if interpret else "cuda", interpreted=interpret, weight_modes=True,
                                 odd_blocks=True, **entries)


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
