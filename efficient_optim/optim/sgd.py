"""SGD with momentum whose momentum buffer can be stored at 8 or 4 bits (torch.optim.SGD's arithmetic)."""

from __future__ import annotations

from ..kernels.dispatch import fused_momentum_step
from ..policy.specs import BITS_NAME
from ..quant.rounding import ROUNDING_MODES
from .base import NONFINITE_POLICIES, CodecOptimizer, check_lr
from .lion import STATE_BITS
from .rule_loop import run_rule
from .validation import check_choice, check_int, check_nonneg, check_positive


def sgd_momentum_update_(param, grad, buf, *, step: int, lr: float, momentum: float, dampening: float,
                         weight_decay: float, nesterov: bool) -> None:  # fmt: skip
    """``torch.optim.SGD``'s step in place (``buf`` is the momentum buffer; on step 1 it becomes the gradient)."""
    if weight_decay:
        grad = grad.add(param, alpha=weight_decay)
    if step == 1:
        buf.copy_(grad)
    else:
        buf.mul_(momentum).add_(grad, alpha=1 - dampening)
    direction = grad.add(buf, alpha=momentum) if nesterov else buf
    param.add_(direction, alpha=-lr)


class SGD(CodecOptimizer):
    """SGD with momentum; the momentum buffer stored at 32, 16, 8 or 4 bits.

    Args:
        params: parameters or param groups.
        lr: learning rate (default 1e-2).
        momentum: momentum factor (default 0.9; must be > 0: plain SGD has no state to compress).
        dampening: dampening for momentum (default 0). weight_decay: L2 penalty added to the gradient (default 0).
        nesterov: Nesterov momentum (default False).
        momentum_bits: buffer storage: 32, 16, 8 (default) or 4.
        block_size: quantization block (default 256 at 8 bits, 128 at 4).
        rounding: ``"nearest"`` (default) or ``"stochastic"``.
        min_quantize_numel: smaller tensors keep an fp32 buffer (default 4096).
        seed, nonfinite, correction_bits, weight_rounding: as in ``CodecOptimizer``.
        policy: as in ``Lion`` (default None: ``momentum_bits`` decides).
    """

    STATE_PREFIX = {"momentum_buffer": "m"}

    def __init__(self, params, lr: float = 1e-2, momentum: float = 0.9, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, momentum_bits: int = 8,
                 block_size: int | None = None, rounding: str = "nearest", min_quantize_numel: int = 4096,
                 seed: int = 0, nonfinite: str = "skip", maximize: bool = False, correction_bits: int | None = None,
                 weight_rounding: str = "auto", policy=None):  # fmt: skip
        check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, m_bits=momentum_bits, m_block_size=block_size, rounding=rounding,
                        min_quantize_numel=min_quantize_numel, seed=seed, nonfinite=nonfinite, maximize=maximize,
                        correction_bits=correction_bits, weight_rounding=weight_rounding)  # fmt: skip
        super().__init__(params, defaults, policy)

    def validate_group(self, group):
        check_lr(group["lr"])
        check_positive("momentum", group["momentum"])
        check_nonneg("dampening", group["dampening"])
        check_nonneg("weight_decay", group["weight_decay"])
        if group["nesterov"] and group["dampening"] != 0:
            raise ValueError("nesterov momentum requires dampening=0")
        check_choice("momentum_bits", group["m_bits"], STATE_BITS)
        check_choice("rounding", group["rounding"], ROUNDING_MODES)
        check_int("min_quantize_numel", group["min_quantize_numel"], 0)
        check_int("seed", group["seed"], 0)
        self.resolve_spec("momentum_buffer", BITS_NAME[group["m_bits"]], None, group)

    def default_specs(self, param, group):
        return {"momentum_buffer": BITS_NAME[group["m_bits"]]}

    def update(self, work):
        def rule(group, p, g, states, step):
            sgd_momentum_update_(p, g, states["momentum_buffer"], step=step, lr=group["lr"],
                                 momentum=group["momentum"], dampening=group["dampening"],
                                 weight_decay=group["weight_decay"], nesterov=group["nesterov"])  # fmt: skip

        def fused(group, p, g, state, codecs, step, salts):
            hyper = {k: group[k] for k in ("lr", "momentum", "dampening", "weight_decay", "nesterov")}
            return fused_momentum_step("sgd", p, g, state, "momentum_buffer", codecs["momentum_buffer"],
                                       salts["momentum_buffer"], {**hyper, "first_step": step == 1})  # fmt: skip

        run_rule(self, work, rule, {"momentum_buffer": 0}, fused)
