"""Gradient release: step each parameter during backward, as soon as its gradient is complete, and free it.

Without release, every gradient lives until ``optimizer.step()``: gradient memory equals parameter
memory. With release, one parameter's gradient at a time exists (plus the ones autograd is still
accumulating), so the gradient term of training memory nearly disappears.

    handle = efficient_optim.enable_gradient_release(model, optimizer)
    for batch in data:
        loss = model(batch).loss
        loss.backward()          # parameters are updated here
        scheduler.step()         # schedulers work as usual (they change the groups' lr)
    handle.remove()              # back to optimizer.step()

Limits (by construction, not by omission):
- **No gradient accumulation**: each ``backward()`` steps the parameters; accumulate by a larger batch.
- **No global gradient clipping**: the global norm is only known after the whole backward, when the early
  gradients are gone. After ``backward()`` every ``p.grad`` is None, so ``clip_grad_norm_`` finds nothing
  and returns 0 (the benchmark harness refuses ``--clip`` with ``--grad-release`` for this reason).
- **The non-finite-gradient policy is per parameter**: with ``nonfinite="skip"`` only the parameters whose
  gradient is bad skip their update (a normal step would skip all of them).
- ``optimizer.step()`` raises while release is on (a second step would be a silent no-op or a double step).
- Only this library's optimizers (they can step one parameter); torch's and external ones raise ``TypeError``.
"""

from __future__ import annotations

import torch

from .base import CodecOptimizer


class GradientRelease:
    """The handle ``enable_gradient_release`` returns: ``remove()`` restores normal steps."""

    def __init__(self, model: torch.nn.Module, optimizer: CodecOptimizer):
        if not isinstance(optimizer, CodecOptimizer):
            raise TypeError(
                f"gradient release needs an optimizer of efficient_optim (it steps one parameter at a time); "
                f"got {type(optimizer).__name__}. Use e.g. QAdamW(bits=32) for fp32 AdamW numbers"
            )
        if optimizer._release is not None:
            raise RuntimeError("gradient release is already enabled on this optimizer")
        handled = {p for g in optimizer.param_groups for p in g["params"]}
        params = [p for p in model.parameters() if p.requires_grad]
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p not in handled]
        if missing:
            raise ValueError(f"parameters not handled by the optimizer: {', '.join(missing[:5])}")
        self.optimizer = optimizer
        self._hooks = [p.register_post_accumulate_grad_hook(self._step) for p in params]
        optimizer._release = self

    def _step(self, param: torch.Tensor) -> None:
        self.optimizer.step_param(param)
        param.grad = None
        # LR schedulers check this flag (set by optimizer.step) to warn about a scheduler stepped before
        # any optimizer step; here the optimizer did step, during backward
        self.optimizer._opt_called = True

    def remove(self) -> None:
        """Remove the hooks; ``optimizer.step()`` works again."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.optimizer._release = None

    @property
    def active(self) -> bool:
        return bool(self._hooks)


def enable_gradient_release(model: torch.nn.Module, optimizer: CodecOptimizer) -> GradientRelease:
    """Step ``optimizer`` per parameter during ``backward()`` and free each gradient; see the module doc."""
    return GradientRelease(model, optimizer)
