"""QAdamW: AdamW whose two moments are stored at 32, 16, 8 or 4 bits."""

from __future__ import annotations

import math

import torch

from ..kernels.cpu import load_cpu_kernels
from ..policy.static import STATE_BITS, moment_codec
from ..quant import MAP_NAMES, SCALE_DTYPES, QuantMap, mix_salt
from ..quant.blockwise import validate_block_size
from ..quant.rounding import ROUNDING_MODES
from ..state import Quantized, sharded
from ..state.compose import learned_moment_codec, with_correction
from ..state.corrected import RESIDUALS
from .adamw_rule import adamw_update_
from .base import NONFINITE_POLICIES, CodecOptimizer, check_lr
from .dense_adamw import DenseAdamWBatch
from .rule_loop import working_views
from .validation import check_betas, check_choice, check_int, check_nonneg, check_positive

# Defaults per moment and width, chosen from the measurements in BENCHMARKS.md: at 4 bits, a square-law
# zero-free v map plus stochastic rounding of m close the gap to fp32 AdamW (each alone does not). v never
# gets a map with a zero level by default, at any width: a v stored as 0 under a nonzero m makes the update
# lr * m / eps (a dead unit's weight moved thousands of times too far; tests/test_optimizer_contract.py).
DEFAULT_MAPS = {("m", 8): "dynamic", ("v", 8): "dynamic_nozero", ("m", 4): "dynamic", ("v", 4): "sqrt_nozero"}
DEFAULT_ROUNDING = {("m", 4): "stochastic"}  # everything else: nearest
_STATE_IDS = {"exp_avg": 0, "exp_avg_sq": 1}


def _kernel_tables(q: QuantMap) -> tuple[list, list, bool]:
    """A map's tables and bucket geometry in the order the fused kernel takes them."""
    tables = [q.levels, q.lut, q.midpoints, q.mid_lut]
    geometry = [q.lut_mantissa_bits, q.lut_exp_range, q.mid_mantissa_bits, q.mid_exp_range]
    return tables, geometry, q.signed


class QAdamW(CodecOptimizer):
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

    The fused kernel covers fp32 CPU parameters whose two moments are both quantized with one block size;
    other combinations use the reference path. Dense fp32 moments use ``torch._fused_adamw_``.
    """

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
    ):
        check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        if amsgrad:
            raise ValueError(f"amsgrad=True is not supported by {type(self).__name__} (its moments are compressed; "
                             "use torch.optim.AdamW(amsgrad=True) for the AMSGrad variant)")
        if fused not in (None, True, False):
            raise ValueError(f"invalid fused: {fused!r} (None, True or False)")
        if fused and load_cpu_kernels() is None:
            raise RuntimeError("fused=True but the CPU kernel could not be built (see the warning above)")
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bits=bits, m_bits=m_bits, v_bits=v_bits,
            m_map=m_map, v_map=v_map, m_block_size=m_block_size, v_block_size=v_block_size, rounding=rounding,
            m_rounding=m_rounding, v_rounding=v_rounding, scale_dtype=scale_dtype,
            min_quantize_numel=min_quantize_numel, seed=seed, nonfinite=nonfinite, maximize=maximize, fused=fused,
            correction_bits=correction_bits, weight_rounding=weight_rounding, m_correct_every=m_correct_every,
            v_correct_every=v_correct_every, ec_residual=ec_residual, map_refit_every=map_refit_every,
        )  # fmt: skip
        super().__init__(params, defaults)

    def validate_group(self, group: dict) -> None:
        check_lr(group["lr"])
        check_betas(group["betas"])
        check_positive("eps", group["eps"])
        check_nonneg("weight_decay", group["weight_decay"])
        check_choice("bits", group["bits"], STATE_BITS)
        for prefix in ("m", "v"):
            b = group[f"{prefix}_bits"]
            if b is not None:
                check_choice(f"{prefix}_bits", b, STATE_BITS)
            qmap = group[f"{prefix}_map"]
            if qmap is not None and not isinstance(qmap, QuantMap):
                check_choice(f"{prefix}_map", qmap, MAP_NAMES)
            if group.get(f"{prefix}_correct_every") is not None:
                check_int(f"{prefix}_correct_every", group[f"{prefix}_correct_every"], 1)
            if group[f"{prefix}_rounding"] is not None:
                check_choice(f"{prefix}_rounding", group[f"{prefix}_rounding"], ROUNDING_MODES)
            bs, width = group[f"{prefix}_block_size"], b or group["bits"]
            if bs is not None:
                try:
                    validate_block_size(bs, width if width in (4, 8) else 8)
                except ValueError as exc:
                    raise ValueError(f"invalid {prefix}_block_size: {exc}") from None
        if group["rounding"] is not None:
            check_choice("rounding", group["rounding"], ROUNDING_MODES)
        check_choice("scale_dtype", group["scale_dtype"], sorted(SCALE_DTYPES))
        check_int("min_quantize_numel", group["min_quantize_numel"], 0)
        check_int("seed", group["seed"], 0)
        check_choice("ec_residual", group.get("ec_residual", "8bit"), RESIDUALS)
        check_int("map_refit_every", group.get("map_refit_every", 100), 0)
        for prefix in ("m", "v"):  # building the codecs validates map x bits combinations now, not mid-run
            bits = group[f"{prefix}_bits"] or group["bits"]
            if bits in (4, 8):
                self._moment_codec(group, prefix, None)

    def _moment_codec(self, group: dict, prefix: str, p: torch.Tensor | None):
        bits = group[f"{prefix}_bits"] or group["bits"]
        resolved = dict(group)
        if resolved[f"{prefix}_map"] is None and bits in (4, 8):
            resolved[f"{prefix}_map"] = DEFAULT_MAPS[(prefix, bits)]
        resolved[f"{prefix}_rounding"] = (
            resolved[f"{prefix}_rounding"] or resolved["rounding"] or DEFAULT_ROUNDING.get((prefix, bits), "nearest")
        )
        if p is None:  # validation only: a size that is always quantized
            resolved["min_quantize_numel"] = 0
            p = torch.empty(0)
        if resolved[f"{prefix}_map"] == "learned" and bits in (4, 8):
            codec = learned_moment_codec(resolved, prefix, p, signed=(prefix == "m"))
        else:
            codec = moment_codec(resolved, prefix, p, signed=(prefix == "m"))
        return with_correction(codec, resolved, prefix, resolved["betas"][0 if prefix == "m" else 1])

    def codecs(self, param, group):
        return {"exp_avg": self._moment_codec(group, "m", param), "exp_avg_sq": self._moment_codec(group, "v", param)}

    def update(self, work):
        for group, items in work:
            dense = DenseAdamWBatch()
            for index, p, g in items:
                codecs = self.codecs(p, group)
                state = self._init_or_check_state(p, group, codecs, index)
                state["step"] += 1
                mc, vc = codecs["exp_avg"], codecs["exp_avg_sq"]
                if mc.is_dense_fp32 and vc.is_dense_fp32 and dense.accepts(p, g):
                    dense.add(p, g, state["exp_avg"], state["exp_avg_sq"], state["step"])
                elif not self._fused_step(group, index, p, g, state, mc, vc):
                    self._reference_step(group, index, p, g, state, codecs)
            dense.run(group)

    def _salt(self, group: dict, index: int, state_name: str, step: int) -> int:
        return mix_salt(group["seed"], index, _STATE_IDS[state_name], step)

    def _reference_step(self, group, index, p, g, state, codecs) -> None:
        step = int(state["step"].item())
        beta1, beta2 = group["betas"]
        pw, gw = working_views(p, g)  # fp64 parameters are computed in fp64
        m = codecs["exp_avg"].decode(state, "exp_avg", p).to(pw.dtype)
        v = codecs["exp_avg_sq"].decode(state, "exp_avg_sq", p).to(pw.dtype)
        adamw_update_(pw, gw, m, v, step=step, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                      weight_decay=group["weight_decay"])  # fmt: skip
        if pw is not p:
            p.copy_(pw)
        for name, value in (("exp_avg", m), ("exp_avg_sq", v)):
            codecs[name].encode(state, name, value, salt=self._salt(group, index, name, step))

    def _fused_step(self, group, index, p, g, state, mc, vc) -> bool:
        """Run the compiled kernel if it applies; False when the reference path must be used."""
        m_salt, v_salt = (self._salt(group, index, name, int(state["step"].item())) for name in _STATE_IDS)
        if sharded.is_dtensor(p):  # a DTensor (FSDP2) shard: its moments are stored for the local shard
            if not (isinstance(mc, sharded.ShardLocal) and isinstance(vc, sharded.ShardLocal)):
                return False
            if not sharded.is_dtensor(g) or g.placements != p.placements:
                return False
            mc, vc = mc.inner, vc.inner
            m_salt, v_salt = sharded.shard_salt(m_salt, p), sharded.shard_salt(v_salt, p)
            p, g = p.to_local(), g.to_local()
        if group["fused"] is False or not (isinstance(mc, Quantized) and isinstance(vc, Quantized)):
            return False
        if mc.block_size != vc.block_size or p.device.type != "cpu" or p.dtype != torch.float32:
            return False
        if g.dtype != torch.float32 or type(p.data) is not torch.Tensor:
            return False
        kernels = load_cpu_kernels()
        if kernels is None:
            return False
        step = int(state["step"].item())
        beta1, beta2 = group["betas"]
        mq, vq = mc.qmap, vc.qmap
        target = p if p.is_contiguous() else p.contiguous()  # a strided parameter steps on a copy
        kernels.adamw_quantized_step(
            target, g.contiguous(),
            state["exp_avg.codes"], state["exp_avg.scales"], *_kernel_tables(mq), mc.bits,
            mc.rounding == "stochastic", m_salt,
            state["exp_avg_sq.codes"], state["exp_avg_sq.scales"], *_kernel_tables(vq), vc.bits,
            vc.rounding == "stochastic", v_salt,
            mc.block_size, group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
            group["lr"] / (1 - beta1**step), math.sqrt(1 - beta2**step),
        )  # fmt: skip
        if target is not p:
            p.copy_(target)
        return True
