"""Split master weights: bf16/fp16 parameters that are updated as if they were fp32.

The model holds low-precision parameters (2 bytes each). The optimizer keeps, per parameter, what the
rounding to that precision threw away, and adds it back before the next update, so the update is applied
to an fp32 *master* weight that never exists between steps:

- ``correction_bits=8`` / ``16``: the rounding residual ``r = w - low(w)``, which is at most half a unit in
  the last place (ulp) of ``low(w)``, stored as a signed ``bits``-bit integer in units of
  ``ulp / (2**bits - 2)`` (so +-ulp/2 fits without clamping).
  bf16 + 16 correction bits carries 8 + 16 = 24 significant bits: fp32's precision, in 4 bytes per
  parameter instead of 4 + 2 (FlashOptim's "weight splitting"). With 8 bits: 16 significant bits.
- ``weight_rounding="kahan"``: a bf16 compensation buffer (Kahan summation), 2 extra bytes per parameter.
- ``weight_rounding="stochastic"``: no extra bytes; the new low-precision weight is rounded up or down with
  probability given by the distance (unbiased), from a counter-based hash of the seed (reproducible).
- ``weight_rounding="nearest"``: plain round-to-nearest, what ``p.copy_(fp32_value)`` does; small updates
  below half an ulp are lost.
- ``weight_rounding="auto"`` (the default): ``"nearest"`` when ``correction_bits`` is set (the residual is
  stored exactly) or the parameter is sharded (DTensor: no master path), else ``"stochastic"`` — zero extra
  bytes, unbiased, and in protocol P8 (docs/master_weights.md) as good as any mode with extra bytes.
  fp32 parameters are never affected.

State keys (plain tensors, ``torch.load(weights_only=True)``-safe): ``weight_correction`` (int8/int16) and
``weight_kahan`` (bf16/fp16), kept in the optimizer's per-parameter state.
"""

from __future__ import annotations

import torch

from ..quant.rounding import uniform_from_hash

LOW_PRECISION = (torch.bfloat16, torch.float16)
CORRECTION_BITS = (8, 16)
WEIGHT_ROUNDING = ("auto", "nearest", "stochastic", "kahan")
MANTISSA_BITS = {torch.bfloat16: 8, torch.float16: 11}  # significant bits including the implicit one
CORRECTION_KEY, KAHAN_KEY = "weight_correction", "weight_kahan"
_INT = {8: torch.int8, 16: torch.int16}


def ulp(low: torch.Tensor) -> torch.Tensor:
    """Unit in the last place of each low-precision value, as float32 (the spacing around it)."""
    _, exponent = torch.frexp(low.float())
    spacing = torch.ldexp(torch.ones_like(exponent, dtype=torch.float32), exponent - MANTISSA_BITS[low.dtype])
    # zero and subnormal values: the smallest normal spacing of the format
    tiny = torch.finfo(low.dtype).tiny * 2.0 ** (1 - MANTISSA_BITS[low.dtype])
    return torch.clamp(spacing, min=tiny)


def correction_steps(bits: int) -> int:
    """Codes per ulp: the residual in [-ulp/2, ulp/2] maps to integers in [-(2**(bits-1) - 1), 2**(bits-1) - 1]."""
    return 2**bits - 2


def encode_correction(master: torch.Tensor, low: torch.Tensor, bits: int) -> torch.Tensor:
    """The residual ``master - low`` as ``bits``-bit integers in units of ``ulp(low) / (2**bits - 2)``."""
    lim = 2 ** (bits - 1) - 1
    q = torch.round((master - low.float()) / ulp(low) * correction_steps(bits))
    return q.clamp_(-lim, lim).to(_INT[bits])


def decode_correction(code: torch.Tensor, low: torch.Tensor, bits: int) -> torch.Tensor:
    """The fp32 master weight ``low + residual`` from a correction code."""
    return low.float() + code.float() * ulp(low) / correction_steps(bits)


def round_stochastic(master: torch.Tensor, dtype: torch.dtype, salt: int) -> torch.Tensor:
    """Unbiased rounding of fp32 values to ``dtype``: up with probability (distance to the lower value)/ulp."""
    down = master.to(dtype)
    down_f = down.float()
    # make ``down`` the value at or below ``master``, ``up`` the next one above
    below = torch.where(down_f > master, torch.nextafter(down, torch.full_like(down, -float("inf"))), down)
    above = torch.nextafter(below, torch.full_like(below, float("inf")))
    below_f, above_f = below.float(), above.float()
    gap = above_f - below_f
    frac = torch.where(gap > 0, (master - below_f) / gap, torch.zeros_like(master))
    u = uniform_from_hash(master.numel(), salt).view_as(master)
    out = torch.where(u < frac, above, below)
    return torch.where(torch.isfinite(master), out, down)


def validate(correction_bits, weight_rounding) -> None:
    if correction_bits is not None and correction_bits not in CORRECTION_BITS:
        raise ValueError(f"correction_bits must be None, 8 or 16, got {correction_bits!r}")
    if weight_rounding not in WEIGHT_ROUNDING:
        raise ValueError(f"weight_rounding must be one of {WEIGHT_ROUNDING}, got {weight_rounding!r}")
    if correction_bits is not None and weight_rounding not in ("nearest", "auto"):
        raise ValueError(
            f"correction_bits={correction_bits} stores the exact rounding residual; it needs weight_rounding='nearest' "
            f"(got {weight_rounding!r})"
        )


def rounding_mode(p: torch.Tensor, group: dict) -> str:
    """The group's ``weight_rounding`` for ``p``, with ``"auto"`` resolved (see the module docstring)."""
    mode = group.get("weight_rounding", "nearest")
    if mode != "auto":
        return mode
    from ..state.sharded import is_dtensor

    return "nearest" if group.get("correction_bits") is not None or is_dtensor(p) else "stochastic"


def uses_master(p: torch.Tensor, group: dict) -> bool:
    """Whether ``p`` is updated through an fp32 master view (low-precision and a non-plain mode)."""
    return p.dtype in LOW_PRECISION and (
        group.get("correction_bits") is not None or rounding_mode(p, group) != "nearest"
    )


def weight_state_bytes(p: torch.Tensor, group: dict) -> int:
    """Bytes the optimizer keeps for ``p``'s weight (correction codes or a Kahan buffer; 0 for a plain weight)."""
    if not uses_master(p, group):
        return 0
    bits = group.get("correction_bits")
    if bits is not None:
        return p.numel() * bits // 8
    return p.numel() * p.element_size() if rounding_mode(p, group) == "kahan" else 0


def open_master(p: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
    """The fp32 master weight of ``p`` (creating the correction storage on first use)."""
    bits = group.get("correction_bits")
    if bits is not None:
        if CORRECTION_KEY not in state:
            state[CORRECTION_KEY] = torch.zeros(p.shape, dtype=_INT[bits], device=p.device)
        return decode_correction(state[CORRECTION_KEY], p.detach(), bits)
    if rounding_mode(p, group) == "kahan":
        if KAHAN_KEY not in state:
            state[KAHAN_KEY] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        return p.detach().float() + state[KAHAN_KEY].float()
    return p.detach().float()


def close_master(p: torch.Tensor, master: torch.Tensor, state: dict, group: dict, salt: int) -> torch.Tensor:
    """Round the updated master back to ``p``'s dtype and store what was lost; returns the new low value."""
    bits, mode = group.get("correction_bits"), rounding_mode(p, group)
    if mode == "stochastic":
        low = round_stochastic(master, p.dtype, salt)
    else:
        low = master.to(p.dtype)
    if bits is not None:
        state[CORRECTION_KEY].copy_(encode_correction(master, low, bits))
    elif mode == "kahan":
        state[KAHAN_KEY].copy_(master - low.float())
    return low


def correction_keys() -> tuple[str, ...]:
    """State keys that hold weight corrections (counted as ``corrections`` by ``training_bytes``)."""
    return (CORRECTION_KEY, KAHAN_KEY)
