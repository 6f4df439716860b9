"""QAdamW: AdamW whose two moments are stored at 32, 16, 8 or 4 bits (a preset of ``optim.adamw.AdamW``)."""

from __future__ import annotations

from ..policy.policies import Policy
from ..policy.specs import BITS_NAME, DEFAULT_MAPS, DEFAULT_ROUNDING, STATE_BITS
from ..quant import QuantMap
from .adamw import AdamW, adam_codec_defaults, check_adam_arguments
from .base import CodecOptimizer
from .validation import check_choice

__all__ = ["DEFAULT_MAPS", "DEFAULT_ROUNDING", "QAdamW"]


class QAdamW(AdamW):
    """AdamW (decoupled weight decay) with block-wise quantized or reduced-precision moments.

    Args:
        params: parameters or param-group dicts; every argument below can be overridden per group.
        lr: learning rate (default 1e-3).
        betas: (beta1, beta2) moment decay rates (default (0.9, 0.999)).
        eps: added to the denominator (default 1e-8).
        weight_decay: decoupled weight decay (default 1e-2, as ``torch.optim.AdamW``).
        bits: storage width of both moments: 32 (fp32, same numbers as ``torch.optim.AdamW``),
            16 (bf16), 8 or 4 (block-wise quantized). Default 8.
        m_bits, v_bits: per-moment override of ``bits`` (default None: use ``bits``).
        m_map, v_map: quantization map of each moment (``dynamic``, ``dynamic_nozero``, ``linear``,
            ``linear_nozero``, ``sqrt_nozero``, ``softsign``, ``learned`` or a ``QuantMap``); None (default)
            picks ``dynamic`` for m, and for v ``dynamic_nozero`` at 8 bits and ``sqrt_nozero`` at 4 bits.
            v's default maps have no zero level: a v stored as 0 where m is not makes that coordinate's
            update ``lr * m / eps`` (thousands of times too large); a map with a zero level for v (e.g.
            ``v_map="dynamic"``) is allowed for studies of that failure.
        m_block_size, v_block_size: elements per quantization block; None (default) = 256 at 8 bits,
            128 at 4 bits.
        rounding: ``"nearest"`` or ``"stochastic"`` (reproducible from ``seed``) for states stored at 16, 8
            or 4 bits; ``m_rounding`` / ``v_rounding`` override it per moment. None (default): stochastic
            for a 4-bit m, nearest for everything else.
        scale_dtype: dtype of the per-block scales: ``"bfloat16"`` (default; rounded up from the fp32
            block maximum, never overflows, half the bytes) or ``"float32"`` (bitsandbytes' layout).
        min_quantize_numel: parameters with fewer elements (judged on the global, unsharded size) keep
            fp32 moments (default 4096).
        seed: seed of stochastic rounding (default 0).
        nonfinite: what a NaN/Inf gradient does: ``"skip"`` the whole step with a warning (default) or
            ``"raise"`` ``FloatingPointError``. Either way no state or parameter is changed.
        fused: use the compiled CPU kernel for quantized moments: None (default) when it is available,
            False never (PyTorch reference path), True always (error if it cannot be built).
        correction_bits: for bf16/fp16 parameters, bits of the stored rounding residual of the fp32 master
            weight: None (default, no master weight), 8 or 16 (see ``optim.master_weights``).
        weight_rounding: rounding of low-precision parameters without correction bits: ``"auto"``
            (default: stochastic for bf16/fp16 parameters, nearest with ``correction_bits``),
            ``"nearest"``, ``"stochastic"`` or ``"kahan"``.
        m_correct_every, v_correct_every: error correction of a quantized (or bf16) moment (protocol P5,
            ``state.corrected.ErrorCorrected``, an ``ErrorFeedback`` with decay = the moment's beta): track
            the moment's accumulated quantization error in a compact residual and add it back every this
            many steps (e.g. 10, 100, 1000); None (default) off.
        ec_residual: how that residual is stored: ``"8bit"`` (default, ~1 B/element), ``"4bit"`` (~0.52),
            ``"bfloat16"`` or ``"float32"``.
        map_refit_every: with ``m_map="learned"`` / ``v_map="learned"`` (protocol P6,
            ``state.learned.LearnedQuantized``), each state tensor gets a k-means codebook of ``2**bits``
            levels fitted to its own values, stored in the state dict and refitted at steps 1, 2, 4, ... then
            every this many steps (default 100; 0 = fit once).

        policy: an ``efficient_optim.policy.Policy`` choosing the width per parameter (``ByName``) or over
            time (``Schedule``); None (default): ``bits`` / ``m_bits`` / ``v_bits`` decide.

    The same as ``AdamW(m=..., v=...)`` with ``"fp32" / "bf16" / "8bit" / "4bit"`` specs. The fused kernel
    covers fp32 CPU parameters whose two moments are both quantized with one block size; other combinations
    use the reference path. Dense fp32 moments use ``torch._fused_adamw_``.
    """

    SPEC_KEYS = ("m_bits", "v_bits")

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        bits: int = 8,
        m_bits: int | None = None,
        v_bits: int | None = None,
        m_map: str | QuantMap | None = None,
        v_map: str | QuantMap | None = None,
        m_block_size: int | None = None,
        v_block_size: int | None = None,
        rounding: str | None = None,
        m_rounding: str | None = None,
        v_rounding: str | None = None,
        scale_dtype: str = "bfloat16",
        min_quantize_numel: int = 4096,
        seed: int = 0,
        nonfinite: str = "skip",
        maximize: bool = False,
        amsgrad: bool = False,
        fused: bool | None = None,
        correction_bits: int | None = None,
        weight_rounding: str = "auto",
        m_correct_every: int | None = None,
        v_correct_every: int | None = None,
        ec_residual: str = "8bit",
        map_refit_every: int = 100,
        policy: Policy | None = None,
    ):
        check_adam_arguments(type(self).__name__, nonfinite, amsgrad, fused)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bits=bits, m_bits=m_bits,
                        v_bits=v_bits, nonfinite=nonfinite, fused=fused)  # fmt: skip
        defaults.update(adam_codec_defaults(
            m_map=m_map, v_map=v_map, m_block_size=m_block_size, v_block_size=v_block_size, rounding=rounding,
            m_rounding=m_rounding, v_rounding=v_rounding, scale_dtype=scale_dtype,
            min_quantize_numel=min_quantize_numel, seed=seed, maximize=maximize, correction_bits=correction_bits,
            weight_rounding=weight_rounding, m_correct_every=m_correct_every, v_correct_every=v_correct_every,
            ec_residual=ec_residual, map_refit_every=map_refit_every,
        ))  # fmt: skip
        CodecOptimizer.__init__(self, params, defaults, policy)

    def default_specs(self, param, group) -> dict:
        return {"exp_avg": BITS_NAME[group["m_bits"] or group["bits"]],
                "exp_avg_sq": BITS_NAME[group["v_bits"] or group["bits"]]}  # fmt: skip

    def validate_group(self, group: dict) -> None:
        check_choice("bits", group["bits"], STATE_BITS)
        for key in ("m_bits", "v_bits"):
            if group[key] is not None:
                check_choice(key, group[key], STATE_BITS)
        super().validate_group(group)
