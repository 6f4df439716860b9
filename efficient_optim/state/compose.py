"""Group options -> the P5/P6 codecs: learned-codebook states and every-K error correction.

Used by ``QAdamW`` (and so ``HybridAdam``) to turn the options ``m_map="learned"`` / ``v_map="learned"``,
``map_refit_every``, ``m_correct_every`` / ``v_correct_every`` and ``ec_residual`` into codecs. Builders are
cached: every parameter with the same settings shares one codec object.
"""

from __future__ import annotations

from functools import cache

from ..policy.static import codec_for, global_numel
from .codec import StateCodec
from .corrected import ErrorCorrected
from .learned import LearnedQuantized


@cache
def learned_codec(bits: int, block_size: int | None, signed: bool, rounding: str, scale_dtype: str,
                  refit_every: int) -> LearnedQuantized:  # fmt: skip
    return LearnedQuantized(bits, block_size, signed, rounding, scale_dtype, refit_every)


@cache
def corrected_codec(inner: StateCodec, every: int, decay: float, residual: str) -> ErrorCorrected:
    return ErrorCorrected(inner, residual, every, float(decay))


def learned_moment_codec(group: dict, prefix: str, param, *, signed: bool) -> StateCodec:
    """The learned-codebook codec of state ``prefix`` (``m``/``v``) from a resolved QAdamW group.

    Parameters below ``min_quantize_numel`` (global size) keep a dense fp32 state, as with every map.
    """
    bits = group.get(f"{prefix}_bits") or group["bits"]
    if global_numel(param) < group["min_quantize_numel"]:
        return codec_for(32)
    rounding = group.get(f"{prefix}_rounding") or group.get("rounding") or "nearest"
    return learned_codec(bits, group.get(f"{prefix}_block_size"), signed, rounding, group["scale_dtype"],
                         group.get("map_refit_every", 100))  # fmt: skip


def with_correction(codec: StateCodec, group: dict, prefix: str, beta: float) -> StateCodec:
    """``codec`` wrapped in ``ErrorCorrected`` when ``{prefix}_correct_every`` is set and the codec is lossy."""
    every = group.get(f"{prefix}_correct_every")
    if not every or codec.is_dense_fp32:
        return codec
    return corrected_codec(codec, every, beta, group.get("ec_residual", "8bit"))
