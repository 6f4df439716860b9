"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): one state, sign updates."""

from __future__ import annotations

from ..kernels.dispatch import fused_momentum_step
from ..policy.specs import BITS_NAME
from ..quant.rounding import ROUNDING_MODES
from .base import NONFINITE_POLICIES, CodecOptimizer, check_lr
from .rule_loop import run_rule
from .validation import check_betas, check_choice, check_int, check_nonneg

STATE_BITS = (32, 16, 8, 4)


def lion_update_(param, grad, exp_avg, *, lr: float, beta1: float, beta2: float, weight_decay: float) -> None:
    """One Lion step in place: ``p -= lr * (sign(beta1 m + (1 - beta1) g) + wd p)``; ``m = beta2 m + (1 - beta2) g``."""
    param.mul_(1 - lr * weight_decay)
    direction = exp_avg.mul(beta1).add_(grad, alpha=1 - beta1).sign_()
    param.add_(direction, alpha=-lr)
    exp_avg.lerp_(grad, 1 - beta2)


class Lion(CodecOptimizer):
    """Lion with its momentum stored at 32, 16, 8 or 4 bits.

    Args:
        params: parameters or param groups (every argument below can be set per group).
        lr: learning rate (default 1e-4; Lion wants ~3-10x less than AdamW).
        betas: (beta1, beta2): interpolation for the update direction and momentum decay (default (0.9, 0.99)).
        weight_decay: decoupled weight decay (default 0.0; use ~3-10x AdamW's).
        m_bits: momentum storage: 32 (fp32, default), 16 (bf16), 8 or 4 (block-wise quantized, dynamic map).
        m_block_size: quantization block (default 256 at 8 bits, 128 at 4 bits).
        rounding: ``"nearest"`` (default) or ``"stochastic"`` for a quantized/bf16 momentum.
        min_quantize_numel: smaller tensors keep fp32 momentum (default 4096).
        seed: stochastic-rounding seed (default 0). nonfinite: ``"skip"`` (default) or ``"raise"``.
        correction_bits, weight_rounding: master weights for bf16/fp16 parameters (see ``CodecOptimizer``).
        policy: an ``efficient_optim.policy.Policy`` choosing the momentum's spec per parameter or over time
            (default None: ``m_bits`` decides).
    """

    STATE_PREFIX = {"exp_avg": "m"}

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0, *, m_bits: int = 32,
                 m_block_size: int | None = None, rounding: str = "nearest", min_quantize_numel: int = 4096,
                 seed: int = 0, nonfinite: str = "skip", maximize: bool = False, correction_bits: int | None = None,
                 weight_rounding: str = "auto", policy=None):  # fmt: skip
        check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, m_bits=m_bits, m_block_size=m_block_size,
                        rounding=rounding, min_quantize_numel=min_quantize_numel, seed=seed, nonfinite=nonfinite, maximize=maximize,
                        correction_bits=correction_bits, weight_rounding=weight_rounding)  # fmt: skip
        super().__init__(params, defaults, policy)

    def validate_group(self, group):
        check_lr(group["lr"])
        check_betas(group["betas"])
        check_nonneg("weight_decay", group["weight_decay"])
        check_choice("m_bits", group["m_bits"], STATE_BITS)
        check_choice("rounding", group["rounding"], ROUNDING_MODES)
        check_int("min_quantize_numel", group["min_quantize_numel"], 0)
        check_int("seed", group["seed"], 0)
        self.resolve_spec("exp_avg", BITS_NAME[group["m_bits"]], None, group)

    def default_specs(self, param, group):
        return {"exp_avg": BITS_NAME[group["m_bits"]]}

    def update(self, work):
        def rule(group, p, g, states, step):
            beta1, beta2 = group["betas"]
            lion_update_(p, g, states["exp_avg"], lr=group["lr"], beta1=beta1, beta2=beta2,
                         weight_decay=group["weight_decay"])  # fmt: skip

        def fused(group, p, g, state, codecs, step, salts):
            beta1, beta2 = group["betas"]
            hyper = {"lr": group["lr"], "beta1": beta1, "beta2": beta2, "weight_decay": group["weight_decay"]}
            return fused_momentum_step("lion", p, g, state, "exp_avg", codecs["exp_avg"], salts["exp_avg"], hyper)

        run_rule(self, work, rule, {"exp_avg": 0}, fused)
