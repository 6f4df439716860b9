"""The codec vocabulary: one place that turns a spec into the codec a state gets.

A *spec* is one of the names ``"fp32" | "bf16" | "8bit" | "4bit" | "factored" | "lowrank"``, a ``StateCodec``
instance, or a recorded codec (``state.spec.codec_to_spec``'s dict). ``resolve_codec(spec, prefix, param,
options)`` builds the codec of state ``prefix`` (``"m"``: signed, e.g. momentum; ``"v"``: non-negative, e.g.
Adam's second moment) from the spec and the optimizer's options for that state (a param group's settings:
maps, block sizes, rounding, scale dtype, error correction, learned maps, rank, seed), applying the one
small-tensor rule (``keeps_full_precision``). Codecs are cached: every parameter with the same settings
shares one codec object.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache

import torch

from ..state import Dense, Factored, Quantized, StateCodec
from ..state.corrected import ErrorCorrected
from ..state.learned import LearnedQuantized
from ..state.spec import codec_from_spec

SPEC_NAMES = ("fp32", "bf16", "8bit", "4bit", "factored", "lowrank")
NAME_BITS = {"fp32": 32, "bf16": 16, "8bit": 8, "4bit": 4}
BITS_NAME = {bits: name for name, bits in NAME_BITS.items()}
STATE_BITS = (32, 16, 8, 4)
DEFAULT_MIN_NUMEL = 4096  # tensors with fewer elements (global size) keep full-precision states
DEFAULT_RANK = 16  # of the "lowrank" spec when no rank is given
# Default map and rounding per state and width, chosen from the measurements in BENCHMARKS.md: at 4 bits, a
# square-law zero-free v map plus stochastic rounding of m close the gap to fp32 AdamW (each alone does not).
# v never gets a map with a zero level by default, at any width: a v stored as 0 under a nonzero m makes the
# update lr * m / eps (a dead unit's weight moved thousands of times too far).
DEFAULT_MAPS = {("m", 8): "dynamic", ("v", 8): "dynamic_nozero", ("m", 4): "dynamic", ("v", 4): "sqrt_nozero"}
DEFAULT_ROUNDING = {("m", 4): "stochastic"}  # everything else: nearest


def global_numel(param: torch.Tensor) -> int:
    """Elements of the whole parameter, not of a local shard (a DTensor reports its global size)."""
    return int(param.numel())


def keeps_full_precision(spec, param: torch.Tensor | None, min_numel: int) -> bool:
    """The small-tensor rule, the only one: a parameter with fewer than ``min_numel`` elements (global size)
    keeps full-precision states whatever its spec says, and so does a vector whose spec needs a matrix
    (``"factored"``, ``"lowrank"``). ``param=None`` (checking settings) is never small."""
    if param is None:
        return False
    if global_numel(param) < min_numel:
        return True
    return spec in ("factored", "lowrank") and param.dim() < 2


def full_precision_codec(param: torch.Tensor | None) -> StateCodec:
    """The dense state that loses nothing: fp32, or fp64 for a float64 parameter (as ``torch.optim`` keeps it)."""
    if param is not None and param.dtype == torch.float64:
        return Dense(torch.float64)
    return codec_for(32)


@cache
def codec_for(
    bits: int,
    *,
    map: str = "dynamic",
    block_size: int | None = None,
    rounding: str = "nearest",
    scale_dtype: str = "float32",
    signed: bool = True,
) -> StateCodec:
    """The (cached, shared) codec for a state stored at ``bits`` bits.

    32 -> ``Dense(float32)``; 16 -> ``Dense(bfloat16)`` (stochastic rounding if asked);
    8 / 4 -> ``Quantized`` with the given map, block size, rounding and scale dtype.
    """
    if bits == 32:
        return Dense(torch.float32)
    if bits == 16:
        return Dense(torch.bfloat16, rounding)
    return Quantized(bits, block_size, map, signed, rounding, scale_dtype)


@cache
def _learned(bits, block_size, signed, rounding, scale_dtype, refit_every) -> LearnedQuantized:
    return LearnedQuantized(bits, block_size, signed, rounding, scale_dtype, refit_every)


@cache
def _corrected(inner: StateCodec, every: int, decay: float, residual: str) -> ErrorCorrected:
    return ErrorCorrected(inner, residual, every, float(decay))


@cache
def _lowrank(prefix: str, rank: int, seed: int, min_numel: int) -> StateCodec:
    from ..state.lowrank import LowRank

    if prefix == "m":  # online factor updates (one subspace iteration per step)
        return LowRank(rank, refresh="online", refresh_every=0, seed=seed, min_numel=min_numel)
    # factors of sqrt(v) refreshed by randomized SVD every 10 steps (never negative when decoded)
    return LowRank(rank, refresh="randomized", refresh_every=10, nonnegative=True, seed=seed, min_numel=min_numel)


def _option(options: Mapping, prefix: str, key: str, default=None):
    value = options.get(f"{prefix}_{key}")
    return default if value is None else value


def rounding_of(options: Mapping, prefix: str, bits: int) -> str:
    """The rounding of state ``prefix`` at ``bits``: ``{prefix}_rounding``, else ``rounding``, else the default."""
    return _option(options, prefix, "rounding") or options.get("rounding") or DEFAULT_ROUNDING.get((prefix, bits), "nearest")


def _quantized(bits: int, prefix: str, options: Mapping) -> StateCodec:
    qmap = _option(options, prefix, "map") or DEFAULT_MAPS[(prefix, bits)]
    rounding = rounding_of(options, prefix, bits)
    scale_dtype = options.get("scale_dtype", "bfloat16")
    block_size = _option(options, prefix, "block_size")
    if qmap == "learned":
        return _learned(bits, block_size, prefix == "m", rounding, scale_dtype, options.get("map_refit_every", 100))
    return codec_for(bits, map=qmap, block_size=block_size, rounding=rounding, scale_dtype=scale_dtype,
                     signed=prefix == "m")  # fmt: skip


def _with_correction(codec: StateCodec, prefix: str, options: Mapping) -> StateCodec:
    every = _option(options, prefix, "correct_every")
    if not every or codec.is_dense_fp32:
        return codec
    beta = options["betas"][0 if prefix == "m" else 1]
    return _corrected(codec, every, beta, options.get("ec_residual", "8bit"))


def resolve_codec(spec, prefix: str, param: torch.Tensor | None, options: Mapping) -> StateCodec:
    """The codec state ``prefix`` (``"m"`` or ``"v"``) of ``param`` gets under ``spec``.

    Args:
        spec: a name of ``SPEC_NAMES``, a ``StateCodec`` instance, or a recorded codec dict.
        prefix: ``"m"`` (a signed state) or ``"v"`` (a non-negative state); picks the ``{prefix}_...`` options.
        param: the parameter (its global size and dimensions decide the small-tensor rule); None when only
            checking the settings (resolved as a large matrix).
        options: the settings the names are built from (a param group): ``{prefix}_map`` (None: the default
            map of ``DEFAULT_MAPS``; ``"learned"``: a fitted codebook), ``{prefix}_block_size``, ``rounding`` /
            ``{prefix}_rounding`` (None: ``DEFAULT_ROUNDING``), ``scale_dtype`` (default ``"bfloat16"``),
            ``min_quantize_numel`` (default 4096), ``{prefix}_correct_every`` with ``ec_residual`` and
            ``betas`` (error correction of a lossy name), ``map_refit_every``, ``rank`` and ``seed``
            (``"lowrank"``).
    """
    if isinstance(spec, Mapping):
        spec = codec_from_spec(spec)
    if keeps_full_precision(spec, param, options.get("min_quantize_numel", DEFAULT_MIN_NUMEL)):
        return full_precision_codec(param)
    if isinstance(spec, StateCodec):
        return spec
    if spec == "fp32":
        return full_precision_codec(param)
    if spec == "factored":
        return Factored()
    if spec == "lowrank":
        return _lowrank(prefix, options.get("rank") or DEFAULT_RANK, options.get("seed", 0),
                        options.get("min_quantize_numel", DEFAULT_MIN_NUMEL))  # fmt: skip
    if spec not in NAME_BITS:
        raise ValueError(f"unknown state spec {spec!r}: use one of {list(SPEC_NAMES)} or a StateCodec instance")
    bits = NAME_BITS[spec]
    if bits == 16:
        codec = codec_for(16, rounding=rounding_of(options, prefix, 16))
    else:
        codec = _quantized(bits, prefix, options)
    return _with_correction(codec, prefix, options)


def check_spec(spec, what: str) -> None:
    """``ValueError`` naming ``what`` unless ``spec`` is a name of ``SPEC_NAMES``, a codec or a recorded codec."""
    if isinstance(spec, (StateCodec, Mapping)):
        return
    if spec not in SPEC_NAMES:
        raise ValueError(f"invalid {what}: {spec!r} (use one of {list(SPEC_NAMES)} or a StateCodec instance)")
