"""Fused Lion and SGD-momentum steps with a block-quantized momentum, in Triton.

There is no C++ kernel for these rules: the CPU path is the PyTorch reference (``optim/lion.py``,
``optim/sgd.py``: decode, the rule in torch ops, encode). The kernels reproduce those torch ops exactly as
torch's CPU kernels round them: ``mul`` by a scalar is one fp32 multiply, ``add(x, alpha=a)`` and ``lerp`` are
single-rounding fused multiply-adds (``fma(x, a, self)``; ``lerp`` = ``fma(w, end - self, self)`` for
``|w| < 0.5``, else ``fma(w - 1, end - self, end)``), and Python-float scalars are rounded to fp32 first. The
momentum is then stored with the quantizer's exact arithmetic (``triton_common``), salted as the reference
salts it (the caller passes ``mix_salt(seed, index, 0, step)``).
"""

from __future__ import annotations

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
    launch,
    map_args,
    salt_i32,
    scales_view,
    tile_indices,
    tile_shape,
)
from .triton_master import close_master, open_master, weight_args

LION, SGD = 0, 1
_G_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _sign(x):
    """torch's ``sign`` on fp32: ``(0 < x) - (x < 0)`` (+0.0 for zeros)."""
    return tl.where(x > 0.0, 1.0, 0.0) - tl.where(x < 0.0, 1.0, 0.0)


@triton.jit(do_not_specialize=["m_salt", "w_salt", "numel", "block_size"])
def _momentum_kernel(
    p_ptr, g_ptr, m_codes, m_scales,
    m_levels, m_lut, m_mids, m_mid_lut, m_mbits, m_erange, m_mid_mbits, m_mid_erange, m_nlev,
    m_salt, numel, block_size, found_inf, corr_ptr, w_salt, c0, c1, c2, c3, c4,
    M_BITS: tl.constexpr, M_SIGNED: tl.constexpr, M_STOCH: tl.constexpr, M_BF16: tl.constexpr,
    RULE: tl.constexpr, FLAG_A: tl.constexpr, FLAG_B: tl.constexpr, FLAG_C: tl.constexpr,
    HAS_FLAG: tl.constexpr, BPP: tl.constexpr, BSP2: tl.constexpr, WEIGHT_MODE: tl.constexpr,
    CORR_BITS: tl.constexpr,
):  # fmt: skip
    """Lion: c0 = 1 - lr wd, c1 = beta1, c2 = 1 - beta1, c3 = -lr, c4 = the lerp coefficient; FLAG_A: the
    lerp weight is < 0.5 in magnitude. SGD: c0 = wd, c1 = momentum, c2 = 1 - dampening, c3 = -lr; FLAG_A:
    weight decay, FLAG_B: first step (buf = g), FLAG_C: Nesterov."""
    block, index, mask, mask_b = tile_indices(tl.program_id(0) * BPP, numel, block_size, BPP, BSP2)
    if HAS_FLAG:
        go = tl.load(found_inf + tl.full([1, 1], 0, tl.int32)) == 0  # [1, 1]: see triton_factored
        mask = mask & go
        mask_b = mask_b & go
    p = open_master(p_ptr, corr_ptr, index, mask, WEIGHT_MODE, CORR_BITS)
    g = tl.load(g_ptr + index, mask=mask, other=0.0).to(tl.float32)
    m = decode_tile(m_codes, m_scales, m_levels, block, index, mask, mask_b, M_BITS, M_BF16)
    if RULE == 0:  # Lion
        p = p * c0
        direction = _sign(tl.fma(g, c2, m * c1))
        p = tl.fma(direction, c3, p)
        if FLAG_A:
            m = tl.fma(c4, g - m, m)
        else:
            m = tl.fma(c4, g - m, g)
    else:  # SGD with momentum
        if FLAG_A:
            g = tl.fma(p, c0, g)
        if FLAG_B:
            m = g
        else:
            m = tl.fma(g, c2, m * c1)
        if FLAG_C:
            p = tl.fma(tl.fma(m, c1, g), c3, p)
        else:
            p = tl.fma(m, c3, p)
    close_master(p, p_ptr, corr_ptr, index, mask, w_salt, WEIGHT_MODE, CORR_BITS)
    encode_tile(m, m_codes, m_scales, m_levels, m_lut, m_mids, m_mid_lut, m_mbits, m_erange, m_mid_mbits,
                m_mid_erange, m_nlev, m_salt, block, index, mask, mask_b, block_size, M_BITS, M_SIGNED, M_STOCH,
                M_BF16, BPP, BSP2)  # fmt: skip


def _f32(x: float) -> float:
    return float(np.float32(x))


def _run(rule: int, p, g, momentum: tuple, block_size: int, coefficients: list, flags: tuple, found_inf,
         weight_correction, weight_salt) -> None:  # fmt: skip
    """Validate and launch the momentum kernel for ``rule``: ``momentum`` = (codes, scales, tables, geometry,
    signed, bits, stochastic, salt); fp32 ``coefficients``; constexpr ``flags``."""
    m_codes, m_scales, m_tables, m_geometry, m_signed, m_bits, m_stochastic, m_salt = momentum
    check_device("p", p)
    check_device("g", g)
    if p.dtype not in (torch.float32, torch.bfloat16) or g.dtype not in _G_DTYPES or p.numel() != g.numel():
        raise ValueError("p must be fp32 or bf16 and g fp32/bf16/fp16 with as many elements")
    check_block_size(block_size, (m_bits,))
    n = p.numel()
    check_codes("momentum", m_codes, m_scales, n, m_bits, block_size)
    if found_inf is not None:
        check_device("found_inf", found_inf)
        if found_inf.dtype != torch.int32 or found_inf.numel() != 1:
            raise ValueError("found_inf must be an int32 tensor of one element")
    target = p if p.is_contiguous() else p.contiguous()
    p_arg, w_args, w_const = weight_args(target, weight_correction, weight_salt)
    if n == 0:
        return
    run, const = map_args("m", m_tables, m_geometry, m_signed, m_bits, p.device)
    ms, bf16 = scales_view(m_scales)
    bpp, bsp2 = tile_shape(block_size)
    c = [_f32(x) for x in coefficients] + [0.0] * (5 - len(coefficients))
    args = dict(p_ptr=p_arg, g_ptr=g.contiguous(), m_codes=m_codes, m_scales=ms, **run, m_salt=salt_i32(m_salt),
                numel=n, block_size=block_size, found_inf=found_inf if found_inf is not None else p_arg, **w_args,
                c0=c[0], c1=c[1], c2=c[2], c3=c[3], c4=c[4])  # fmt: skip
    const.update(M_STOCH=bool(m_stochastic), M_BF16=bf16, RULE=rule, FLAG_A=flags[0], FLAG_B=flags[1],
                 FLAG_C=flags[2], HAS_FLAG=found_inf is not None, BPP=bpp, BSP2=bsp2, **w_const)  # fmt: skip
    launch(_momentum_kernel, (triton.cdiv(m_scales.numel(), bpp),), args, const, bpp * bsp2)
    if target is not p:
        p.copy_(target)


def lion_quantized_step(p, g, m_codes, m_scales, m_tables, m_geometry, m_signed, m_bits, m_stochastic, m_salt,
                        block_size, lr, beta1, beta2, weight_decay, *, found_inf=None, weight_correction=None,
                        weight_salt=None) -> None:  # fmt: skip
    """One Lion step (``optim.lion.lion_update_``) with a block-quantized momentum, in place.

    Args:
        p: fp32 parameter, or bf16 with ``weight_correction`` / ``weight_salt`` (see ``triton_master``).
        g: gradient (fp32/bf16/fp16).
        m_codes, m_scales, m_tables, m_geometry, m_signed, m_bits, m_stochastic, m_salt: the momentum's
            storage and map, as ``adamw_quantized_step``'s m arguments.
        block_size: elements per quantization block.
        lr, beta1, beta2, weight_decay: Lion's hyperparameters.
        found_inf: optional int32 device flag; nonzero at run time = nothing written. Default None.
        weight_correction, weight_salt: master-weight mode of a bf16 ``p`` (as ``adamw_quantized_step``).
    """
    weight = np.float32(1 - beta2)  # lerp's weight, rounded to fp32 as torch does
    small = bool(abs(weight) < 0.5)
    coef = weight if small else weight - np.float32(1.0)
    momentum = (m_codes, m_scales, m_tables, m_geometry, m_signed, m_bits, m_stochastic, m_salt)
    _run(LION, p, g, momentum, block_size, [1 - lr * weight_decay, beta1, 1 - beta1, -lr, float(coef)],
         (small, False, False), found_inf, weight_correction, weight_salt)  # fmt: skip


def sgd_quantized_step(p, g, m_codes, m_scales, m_tables, m_geometry, m_signed, m_bits, m_stochastic, m_salt,
                       block_size, lr, momentum, dampening, weight_decay, nesterov, first_step, *, found_inf=None,
                       weight_correction=None, weight_salt=None) -> None:  # fmt: skip
    """One SGD-momentum step (``optim.sgd.sgd_momentum_update_``, torch.optim.SGD's arithmetic), in place.

    Args:
        p, g, m_*: as ``lion_quantized_step`` (m is the momentum buffer).
        block_size: elements per quantization block.
        lr, momentum, dampening, weight_decay, nesterov: SGD's hyperparameters.
        first_step: True on step 1 (the buffer becomes the gradient).
        found_inf, weight_correction, weight_salt: as ``lion_quantized_step``.
    """
    buffer = (m_codes, m_scales, m_tables, m_geometry, m_signed, m_bits, m_stochastic, m_salt)
    _run(SGD, p, g, buffer, block_size, [weight_decay, momentum, 1 - dampening, -lr],
         (bool(weight_decay), bool(first_step), bool(nesterov)), found_inf, weight_correction, weight_salt)  # fmt: skip
