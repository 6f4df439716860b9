"""Adafactor (Shazeer & Stern 2018): factored second moment, update clipping, relative step size.

The arithmetic follows ``transformers.optimization.Adafactor`` (tested against it); the second moment is
the ``Factored`` codec (row/column means, dense for 1-D tensors) and the optional first moment any codec
(fp32, bf16, 8- or 4-bit).
"""

from __future__ import annotations

import math

import torch

from ..kernels.adafactor_order import AdafactorScalars
from ..kernels.dispatch import fused_adafactor_step
from ..policy.specs import BITS_NAME
from ..quant.rounding import ROUNDING_MODES, mix_salt
from ..state.factored import Factored
from ..state.sharded import resolve_partial
from .base import NONFINITE_POLICIES, CodecOptimizer, check_lr
from .lion import STATE_BITS
from .rule_loop import begin_param_step, run_rule
from .validation import check_beta, check_choice, check_int, check_nonneg, check_positive

_FACTORED = Factored()


def _rms(t: torch.Tensor) -> float:
    # the global RMS of a DTensor: its norm is a pending partial reduction until resolved
    return float(resolve_partial(t.detach().norm(2)) / math.sqrt(t.numel()))


class Adafactor(CodecOptimizer):
    """Adafactor with the paper's (and transformers') defaults.

    Args:
        params: parameters or param groups.
        lr: external learning rate; None (default) uses the relative step ``min(1e-2, 1/sqrt(step))``.
            Giving ``lr`` with ``relative_step=True`` is an error (as in transformers).
        eps: (eps1, eps2): added to the squared gradient, and the floor of the parameter scale
            (default (1e-30, 1e-3)).
        clip_threshold: the update's RMS is clipped to this (default 1.0).
        decay_rate: the second-moment decay is ``1 - step ** decay_rate`` (default -0.8).
        beta1: first-moment decay; None (default) keeps no first moment.
        weight_decay: decoupled weight decay, scaled by the step size (default 0.0).
        scale_parameter: multiply the relative step by ``max(eps2, RMS(param))`` (default True).
        relative_step: time-dependent step size (default True).
        warmup_init: relative step ``min(1e-6 * step, 1/sqrt(step))`` (default False).
        m_bits: storage of the first moment when ``beta1`` is set: 32 (default), 16, 8 or 4.
        rounding, min_quantize_numel, seed, nonfinite, correction_bits, weight_rounding, policy: as in ``Lion``.
        fused: the fused step of a 2-D parameter (factored second moment; no first moment, a quantized or an
            fp32 one). None (default): the device's kernel where its provider has one (Triton on CUDA), the
            reference path elsewhere (the CPU). True: that kernel's arithmetic everywhere
            (``kernels.adafactor_order``: the CPU computes the same bits as the GPU kernel, so checkpoints
            move between them exactly). False: always the reference path. The kernel's arithmetic fixes the
            order of every sum; it equals the reference path to float rounding, not bit for bit.
    """

    STATE_PREFIX = {"exp_avg": "m", "exp_avg_sq": "v"}

    def __init__(self, params, lr: float | None = None, eps=(1e-30, 1e-3), clip_threshold: float = 1.0,
                 decay_rate: float = -0.8, beta1: float | None = None, weight_decay: float = 0.0,
                 scale_parameter: bool = True, relative_step: bool = True, warmup_init: bool = False, *,
                 m_bits: int = 32, rounding: str = "nearest", min_quantize_numel: int = 4096, seed: int = 0,
                 nonfinite: str = "skip", maximize: bool = False, correction_bits: int | None = None, weight_rounding: str = "auto", policy=None,
                 fused: bool | None = None):  # fmt: skip
        if lr is not None and relative_step:
            raise ValueError("Adafactor: cannot combine a manual lr with relative_step=True (set relative_step=False)")
        if warmup_init and not relative_step:
            raise ValueError("Adafactor: warmup_init=True requires relative_step=True")
        check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        defaults = dict(lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate, beta1=beta1,
                        weight_decay=weight_decay, scale_parameter=scale_parameter, relative_step=relative_step,
                        warmup_init=warmup_init, m_bits=m_bits, rounding=rounding,
                        min_quantize_numel=min_quantize_numel, seed=seed, nonfinite=nonfinite, maximize=maximize,
                        correction_bits=correction_bits, weight_rounding=weight_rounding, fused=fused)  # fmt: skip
        super().__init__(params, defaults, policy)

    def validate_group(self, group):
        if group["lr"] is not None:
            check_lr(group["lr"])
        eps = group["eps"]
        if not (isinstance(eps, (tuple, list)) and len(eps) == 2):
            raise ValueError(f"eps must be a pair (eps1, eps2), got {eps!r}")
        check_nonneg("eps[0]", eps[0])
        check_nonneg("eps[1]", eps[1])
        check_positive("clip_threshold", group["clip_threshold"])
        if not -1.0 <= group["decay_rate"] < 0:
            raise ValueError(f"decay_rate must be in [-1, 0), got {group['decay_rate']}")
        if group["beta1"] is not None:
            check_beta("beta1", group["beta1"])
        check_nonneg("weight_decay", group["weight_decay"])
        check_choice("m_bits", group["m_bits"], STATE_BITS)
        check_choice("rounding", group["rounding"], ROUNDING_MODES)
        check_int("min_quantize_numel", group["min_quantize_numel"], 0)
        check_int("seed", group["seed"], 0)
        if group.get("fused") not in (None, True, False):
            raise ValueError(f"invalid fused: {group['fused']!r} (None, True or False)")
        self.resolve_spec("exp_avg", BITS_NAME[group["m_bits"]], None, group)

    def default_specs(self, param, group):
        out = {"exp_avg_sq": "factored"}
        if group["beta1"] is not None:
            out["exp_avg"] = BITS_NAME[group["m_bits"]]
        return out

    def resolve_spec(self, name, spec, param, group):
        if spec == "factored":  # Adafactor's own v: factored at every size (dense only for vectors)
            return _FACTORED
        return super().resolve_spec(name, spec, param, group)

    @staticmethod
    def step_size(group: dict, param: torch.Tensor, step: int) -> float:
        """The step's learning rate: ``lr`` or the relative step, times the parameter scale if asked."""
        rel = Adafactor.relative_step(group, step)
        scale = max(group["eps"][1], _rms(param)) if group["scale_parameter"] else 1.0
        return scale * rel

    @staticmethod
    def relative_step(group: dict, step: int) -> float:
        """The step size before the parameter scale: ``lr``, or the relative step of ``step``."""
        if group["relative_step"]:
            return min(1e-6 * step if group["warmup_init"] else 1e-2, 1.0 / math.sqrt(step))
        return group["lr"]

    def update(self, work):
        generic = []
        for group, items in work:
            rest = []
            for item in items:
                _, p, _ = item
                if self.codecs(p, group)["exp_avg_sq"] is _FACTORED and Factored.factors(p):
                    self._factored_step(group, *item)
                else:
                    rest.append(item)
            generic.append((group, rest))

        def rule(group, p, g, states, step):
            lr = self.step_size(group, p, step)
            beta2t = 1.0 - step ** group["decay_rate"]
            v = states["exp_avg_sq"]
            v.mul_(beta2t).add_(g.square().add_(group["eps"][0]), alpha=1 - beta2t)
            u = g * Factored.project_(v).rsqrt()  # the factored estimate of the new moment, as the paper
            u.div_(max(1.0, _rms(u) / group["clip_threshold"]))
            u.mul_(lr)
            if "exp_avg" in states:
                u = states["exp_avg"].mul_(group["beta1"]).add_(u, alpha=1 - group["beta1"])
            if group["weight_decay"]:
                p.add_(p, alpha=-group["weight_decay"] * lr)
            p.sub_(u)

        run_rule(self, generic, rule, {"exp_avg": 0, "exp_avg_sq": 1})

    def _factored_step(self, group: dict, index: int, p: torch.Tensor, g: torch.Tensor) -> None:
        """The rule of ``update`` for a plain (not sharded) >= 2-D parameter, computed on the row/column
        statistics directly instead of decoding them into a dense second moment: the same arithmetic
        (the row/column means of ``beta2t * outer(r, c) / mean(r) + (1 - beta2t) (g^2 + eps1)``, the
        reconstruction the update divides by, and what encoding the projected moment stores), without the
        three dense passes. Equal to the generic path to float rounding (tests/test_rules.py)."""
        codecs, state, step, p32, g32 = begin_param_step(self, group, index, p, g)
        if p32 is p and group.get("fused") is not False and self._fused_step(group, index, p, g, codecs, state, step):
            return
        lr = self.step_size(group, p32, step)
        beta2t = 1.0 - step ** group["decay_rate"]
        row, col, _ = codecs["exp_avg_sq"].kernel_operands(state, "exp_avg_sq")
        sq = g32.square().add_(group["eps"][0])
        old_row_mean = row.mean(dim=-1, keepdim=True)  # of the stored (old) statistics
        scale = old_row_mean.clamp_min(_FACTORED.eps)
        ratio_r, ratio_c = col.mean(dim=-1, keepdim=True) / scale, old_row_mean / scale
        row.mul_(ratio_r).mul_(beta2t).add_(sq.mean(dim=-1), alpha=1 - beta2t)
        col.mul_(ratio_c).mul_(beta2t).add_(sq.mean(dim=-2), alpha=1 - beta2t)
        row_mean, col_mean = row.mean(dim=-1, keepdim=True), col.mean(dim=-1, keepdim=True)
        new_scale = row_mean.clamp_min(_FACTORED.eps)
        # rsqrt(outer(r, c) / mean(r)) = outer(rsqrt(r / mean(r)), rsqrt(c)): on the vectors, not the matrix
        u = (row / new_scale).rsqrt_().unsqueeze(-1) * col.rsqrt().unsqueeze(-2)
        u.mul_(g32)
        # what encoding the projected (rank-1) moment stores: its row and column means
        row.mul_(col_mean / new_scale)
        col.mul_(row_mean / new_scale)
        u.div_(max(1.0, _rms(u) / group["clip_threshold"]))
        u.mul_(lr)
        if "exp_avg" in codecs:
            m = codecs["exp_avg"].decode(state, "exp_avg", p)
            u = m.mul_(group["beta1"]).add_(u, alpha=1 - group["beta1"])
            codecs["exp_avg"].encode(state, "exp_avg", m, salt=mix_salt(group.get("seed", 0), index, 0, step))
        if group["weight_decay"]:
            p32.add_(p32, alpha=-group["weight_decay"] * lr)
        p32.sub_(u)
        if p32 is not p:
            p.copy_(p32)

    def _fused_step(self, group: dict, index: int, p, g, codecs: dict, state: dict, step: int) -> bool:
        """The fused factored step (``kernels.dispatch.fused_adafactor_step``); False when none applies."""
        beta2t = 1.0 - step ** group["decay_rate"]
        hp = AdafactorScalars(rel=self.relative_step(group, step), eps1=group["eps"][0], eps2=group["eps"][1],
                              clip_threshold=group["clip_threshold"], beta2t=beta2t,
                              beta1=group["beta1"] if "exp_avg" in codecs else None,
                              weight_decay=group["weight_decay"], scale_parameter=group["scale_parameter"],
                              m_salt=mix_salt(group.get("seed", 0), index, 0, step))  # fmt: skip
        return fused_adafactor_step(p, g, state, codecs["exp_avg_sq"], codecs.get("exp_avg"), hp,
                                    portable=group.get("fused") is True)  # fmt: skip
