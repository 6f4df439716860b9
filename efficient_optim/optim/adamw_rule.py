"""The AdamW update rule over full-precision views, in functional form.

The same arithmetic as ``torch.optim.AdamW``'s single-tensor path (decoupled weight decay, bias
correction), written once and used by every storage codec.
"""

from __future__ import annotations

import math

import torch


def adamw_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step, in place on fp32 ``param``, ``exp_avg`` (m) and ``exp_avg_sq`` (v).

    Args:
        param: the parameter (fp32 working copy), updated in place.
        grad: its gradient (fp32).
        exp_avg: first moment m, updated in place: ``m = beta1 m + (1 - beta1) g``.
        exp_avg_sq: second moment v, updated in place: ``v = beta2 v + (1 - beta2) g^2``.
        step: the step number after incrementing (1 on the first step), for bias correction.
        lr, beta1, beta2, eps, weight_decay: the AdamW hyperparameters.
    """
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)
