"""AdamW on dense fp32 moments through ``torch._fused_adamw_``, batched over a group's parameters.

Shared by every Adam variant of the library whose two moments are plain fp32 tensors (``bits=32``, and every
tensor below ``min_quantize_numel`` with the defaults): one fused call per param group, the same numbers as
``torch.optim.AdamW(fused=True)``.

``torch._fused_adamw_``'s CPU kernel indexes the parameter, gradient and moments as if they shared one
layout: a strided parameter (a view, a transposed weight) whose gradient is laid out differently gets wrong
updates. Such tensors are stepped on contiguous copies that are written back after the call, which gives
exactly the numbers of a contiguous parameter.
"""

from __future__ import annotations

import torch


class DenseAdamWBatch:
    """Collects fp32 parameters with dense fp32 moments, then steps them in one ``torch._fused_adamw_`` call.

    ``add(param, grad, exp_avg, exp_avg_sq, step)`` queues one parameter (``step``: its step-count tensor,
    already incremented); ``run(group)`` applies the group's ``lr``, ``betas``, ``eps`` and
    ``weight_decay`` to everything queued. One batch serves one group's step.
    """

    def __init__(self):
        self._lists: tuple[list, list, list, list, list] = ([], [], [], [], [])
        self._write_back: list[tuple[torch.Tensor, torch.Tensor]] = []

    @staticmethod
    def accepts(param: torch.Tensor, grad: torch.Tensor) -> bool:
        """Whether this path applies: an fp32 parameter and gradient (moments checked by the caller)."""
        return param.dtype == torch.float32 and grad.dtype == torch.float32

    def add(self, param, grad, exp_avg, exp_avg_sq, step) -> None:
        tensors = (param, grad, exp_avg, exp_avg_sq)
        if not all(t.is_contiguous() for t in tensors):
            copies = tuple(t.contiguous() for t in tensors)
            for original, copy in zip((param, exp_avg, exp_avg_sq), (copies[0], copies[2], copies[3])):
                if copy is not original:
                    self._write_back.append((original, copy))
            tensors = copies
        for lst, t in zip(self._lists, (*tensors, step)):
            lst.append(t)

    def run(self, group: dict) -> None:
        if not self._lists[0]:
            return
        beta1, beta2 = group["betas"]
        params, grads, exp_avgs, exp_avg_sqs, steps = self._lists
        torch._fused_adamw_(
            params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=group["lr"], beta1=beta1, beta2=beta2,
            weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False, maximize=False,
        )  # fmt: skip
        with torch.no_grad():
            for original, copy in self._write_back:
                original.copy_(copy)
