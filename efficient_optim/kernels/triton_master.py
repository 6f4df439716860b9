"""bf16 parameters with fp32 master weights inside the fused Triton steps (``optim/master_weights.py``).

The step kernels take a bf16 parameter in one of two modes and compute on its fp32 master weight, so the
master never exists in memory:

- ``weight_correction`` (int8 or int16, the parameter's shape): the rounding residual in units of
  ``ulp(low) / (2**bits - 2)``. The master is ``low + code * ulp / steps``; after the update the new low value
  is the master rounded to nearest (even) and the new code ``round((master - low) / ulp * steps)`` (half to
  even), clamped to ``+-(2**(bits-1) - 1)``: ``decode_correction`` / ``encode_correction`` operation for
  operation, with ``ulp`` from the bf16 exponent exactly as ``torch.frexp``/``ldexp`` give it (zero: 2**-8,
  as the reference's ``frexp(0) = 0``; subnormals: the clamp 2**-133).
- ``weight_salt`` (an int): the master is the bf16 value; the new one is rounded stochastically
  (``round_stochastic``: up with probability (master - below) / gap, the counter hash of the element's
  index and the salt, ``nextafter`` on the bf16 bit patterns).

The CPU path (``CodecOptimizer._update_through_master``) does the same around the fused CPU kernel, so the
stored bf16 weights, corrections and states are the same bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import check_device, salt_i32, uniform_from_hash

FP32, CORRECTED, STOCHASTIC = 0, 1, 2  # WEIGHT_MODE values
_CORRECTION_DTYPES = {torch.int8: 8, torch.int16: 16}


@triton.jit
def bf16_to_f32(low):
    """fp32 value of bf16 bit patterns held in uint32."""
    return (low << 16).to(tl.float32, bitcast=True)


@triton.jit
def f32_to_bf16_nearest(x):
    """bf16 bit patterns (in uint32) of fp32 ``x`` rounded to nearest even, NaN as 0x7FC0 (torch's rule)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, rounded)


@triton.jit
def bf16_ulp(low):
    """``master_weights.ulp`` of bf16 values (uint32 bit patterns): 2**(frexp exponent - 8), at least 2**-133."""
    exp_field = ((low >> 7) & 0xFF).to(tl.int32)
    k = exp_field - 134  # frexp exponent (exp_field - 126) minus bf16's 8 significant bits
    normal = ((k + 127).to(tl.uint32) << 23).to(tl.float32, bitcast=True)
    tiny = (tl.full(low.shape, 1, tl.uint32) << 16).to(tl.float32, bitcast=True)  # 2**-133
    small = (tl.full(low.shape, 1, tl.uint32) << tl.maximum(k + 149, 0).to(tl.uint32)).to(
        tl.float32, bitcast=True
    )
    zero = (low & 0x7FFF) == 0
    ulp = tl.where(exp_field >= 8, normal, small)
    ulp = tl.where(exp_field == 0, tiny, ulp)
    return tl.where(zero, 1.0 / 256.0, ulp)


@triton.jit
def round_half_even(x):
    """torch.round (half to even) of fp32 values below 2**22 in magnitude: the 1.5 * 2**23 shift."""
    return (x + 12582912.0) - 12582912.0


@triton.jit
def open_master(p_ptr, corr_ptr, index, mask, MODE: tl.constexpr, CORR_BITS: tl.constexpr):
    """The fp32 working weight of the elements ``index``: the parameter itself (fp32), or a bf16 parameter
    plus its correction, or the bf16 value."""
    if MODE == 0:
        return tl.load(p_ptr + index, mask=mask, other=0.0)
    else:
        low = tl.load(p_ptr + index, mask=mask, other=0).to(tl.uint16, bitcast=True).to(tl.uint32)
        master = bf16_to_f32(low)
        if MODE == 1:
            code = tl.load(corr_ptr + index, mask=mask, other=0).to(tl.float32)
            steps = 2.0**CORR_BITS - 2.0
            master = master + tl.math.div_rn(code * bf16_ulp(low), tl.full(code.shape, steps, tl.float32))
        return master


@triton.jit
def close_master(master, p_ptr, corr_ptr, index, mask, salt, MODE: tl.constexpr, CORR_BITS: tl.constexpr):
    """Store the updated working weight: fp32 as is; bf16 to nearest with its correction; or bf16 rounded
    stochastically (``index`` and ``salt`` draw the number)."""
    if MODE == 0:
        tl.store(p_ptr + index, master, mask=mask)
    else:
        down = f32_to_bf16_nearest(master)
        if MODE == 1:
            low = down
            steps = 2.0**CORR_BITS - 2.0
            lim = 2.0 ** (CORR_BITS - 1) - 1.0
            scaled = tl.math.div_rn(master - bf16_to_f32(low), bf16_ulp(low)) * steps
            code = round_half_even(scaled)
            code = tl.where(code < -lim, -lim, code)
            code = tl.where(code > lim, lim, code)
            if CORR_BITS == 8:
                tl.store(corr_ptr + index, code.to(tl.int8), mask=mask)
            else:
                tl.store(corr_ptr + index, code.to(tl.int16), mask=mask)
        else:
            down_f = bf16_to_f32(down)
            sign = down >> 15
            is_zero = (down & 0x7FFF) == 0
            toward_minus = tl.where(is_zero, 0x8001, tl.where(sign == 0, down - 1, down + 1))
            below = tl.where(down_f > master, toward_minus, down)
            below_zero = (below & 0x7FFF) == 0
            above = tl.where(below_zero, 0x0001, tl.where((below >> 15) == 0, below + 1, below - 1))
            above = tl.where(below == 0x7F80, below, above)  # nextafter(+inf, +inf) = +inf
            below_f = bf16_to_f32(below)
            gap = bf16_to_f32(above) - below_f
            positive = gap > 0.0
            frac = tl.where(positive, tl.math.div_rn(master - below_f, tl.where(positive, gap, 1.0)), 0.0)
            low = tl.where(uniform_from_hash(index, salt) < frac, above, below)
            finite = (master.to(tl.uint32, bitcast=True) & 0x7F800000) != 0x7F800000
            low = tl.where(finite, low, down)
        tl.store(p_ptr + index, low.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)


def weight_args(p: torch.Tensor, weight_correction, weight_salt) -> tuple[torch.Tensor, dict, dict]:
    """The parameter pointer, the correction pointer and salt (runtime) and the mode and correction width
    (constexpr) of a fused step on ``p``.

    Args:
        p: fp32 (no master) or bf16 parameter (contiguous; bf16 is addressed as its int16 bits).
        weight_correction: int8/int16 correction codes of a bf16 ``p`` (``correction_bits`` 8/16), or None.
        weight_salt: the weight-rounding salt of a bf16 ``p`` rounded stochastically, or None.
    """
    if p.dtype == torch.float32:
        if weight_correction is not None or weight_salt is not None:
            raise ValueError("weight_correction / weight_salt apply to bf16 parameters only")
        return p, {"corr_ptr": p, "w_salt": 0}, {"WEIGHT_MODE": FP32, "CORR_BITS": 8}
    if p.dtype != torch.bfloat16:
        raise ValueError(f"the fused steps take fp32 or bf16 parameters, got {p.dtype}")
    if (weight_correction is None) == (weight_salt is None):
        raise ValueError("a bf16 parameter needs exactly one of weight_correction (int8/int16 codes) or "
                         "weight_salt (stochastic rounding)")  # fmt: skip
    if weight_correction is None:
        return (
            p.view(torch.int16),
            {"corr_ptr": p, "w_salt": salt_i32(weight_salt)},
            {"WEIGHT_MODE": STOCHASTIC, "CORR_BITS": 8},
        )
    check_device("weight_correction", weight_correction)
    bits = _CORRECTION_DTYPES.get(weight_correction.dtype)
    if bits is None or weight_correction.shape != p.shape or not weight_correction.is_contiguous():
        raise ValueError(
            "weight_correction must be a contiguous int8 or int16 tensor of the parameter's shape"
        )
    return (
        p.view(torch.int16),
        {"corr_ptr": weight_correction, "w_salt": 0},
        {"WEIGHT_MODE": CORRECTED, "CORR_BITS": bits},
    )
