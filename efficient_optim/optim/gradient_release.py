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

``compressor=`` (an ``efficient_optim.compress`` compressor, e.g. ``ErrorFeedback(Quantize(4))``) compresses
each gradient before its parameter is stepped: the step sees ``decompress(compress(g))``, the error-feedback
residual (kept compressed, per parameter) carries what was lost to the next step. This saves no memory (the
gradient is freed at once anyway; the residual adds to it): it is the per-layer gradient a sharded or
data-parallel step would receive, and where gradient bits meet the optimizer's state bits (docs/mango.md).

``observer=`` is called as ``observer(key, grad)`` with each finite gradient before it is compressed (``key``:
the parameter's position among the model's trainable parameters). ``controller=`` (a ``compress.Controller``
over those parameters, in that order) is the short form: it observes every gradient, and the compressor is
its ``gradients``, whose per-layer specs its decisions set (``controller.step`` after each backward; a
decision applies from the next step on).
"""

from __future__ import annotations

import torch

from ..compress.feedback import as_gradient_compressor
from .base import CodecOptimizer


class GradientRelease:
    """The handle ``enable_gradient_release`` returns: ``remove()`` restores normal steps.

    Args:
        model: the module whose trainable parameters are stepped during backward.
        optimizer: an efficient_optim optimizer holding every trainable parameter of ``model``.
        compressor: compress each gradient before its step (a ``Compressor`` or ``GradientCompressor`` of
            ``efficient_optim.compress``; default None: the exact gradient).
        observer: called as ``observer(key, grad)`` with each finite gradient before compression (``key``: the
            parameter's position among the trainable parameters; default None).
        controller: a ``compress.Controller`` over the trainable parameters in order: observes every gradient
            and sets the per-layer compressor specs of its ``gradients``, which is then the compressor (default
            None). Not with ``observer``; ``compressor``, if given, must be ``controller.gradients``.
    """

    def __init__(self, model: torch.nn.Module, optimizer: CodecOptimizer, compressor=None, observer=None,
                 controller=None):  # fmt: skip
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
        if controller is not None:
            compressor, observer = _controlled(controller, params, compressor, observer)
        if observer is not None and not callable(observer):
            raise ValueError(f"observer must be callable as observer(key, grad), got {observer!r}")
        self.optimizer, self.observer, self.controller = optimizer, observer, controller
        self.compressor = as_gradient_compressor(compressor) if compressor is not None else None
        self._keys = {p: i for i, p in enumerate(params)}  # the compressor's state is kept per parameter
        self._hooks = [p.register_post_accumulate_grad_hook(self._step) for p in params]
        optimizer._release = self

    def _step(self, param: torch.Tensor) -> None:
        if self.observer is not None and param.grad is not None and bool(torch.isfinite(param.grad).all()):
            self.observer(self._keys[param], param.grad.detach())
        if self.compressor is not None and param.grad is not None:
            self._compress(param)
        self.optimizer.step_param(param)
        param.grad = None
        # LR schedulers check this flag (set by optimizer.step) to warn about a scheduler stepped before
        # any optimizer step; here the optimizer did step, during backward
        self.optimizer._opt_called = True

    @torch.no_grad()
    def _compress(self, param: torch.Tensor) -> None:
        key = self._keys[param]
        try:
            payload = self.compressor.compress(key, param.grad)
        except FloatingPointError:  # left as is: the optimizer's non-finite policy skips or raises
            return
        param.grad = self.compressor.decompress(key, payload).view_as(param).to(param.grad.dtype)

    def compressor_state_nbytes(self) -> int:
        """Bytes the compressor keeps between steps (error-feedback residuals); 0 without one."""
        return 0 if self.compressor is None else self.compressor.state_nbytes()

    def state_dict(self) -> dict:
        """The compressor's state (residuals; empty without a compressor): save it to resume exactly."""
        return {} if self.compressor is None else {"compressor": self.compressor.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.compressor is not None:
            self.compressor.load_state_dict(state["compressor"])

    def remove(self) -> None:
        """Remove the hooks; ``optimizer.step()`` works again."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.optimizer._release = None

    @property
    def active(self) -> bool:
        return bool(self._hooks)


def _controlled(controller, params: list, compressor, observer) -> tuple:
    """The compressor and observer of a release driven by ``controller`` (see ``GradientRelease``)."""
    if not all(hasattr(controller, a) for a in ("params", "gradients", "observe")):
        raise ValueError(f"controller must be an efficient_optim.compress Controller, got {controller!r}")
    if observer is not None:
        raise ValueError("give observer= or controller= (which observes), not both")
    if compressor is not None and compressor is not controller.gradients:
        raise ValueError("compressor= must be the controller's own gradients compressor (its decisions set that "
                         "one's per-layer specs); leave it out to use controller.gradients")  # fmt: skip
    if len(controller.params) != len(params) or any(a is not b for a, b in zip(controller.params, params, strict=False)):
        raise ValueError(f"the controller's {len(controller.params)} parameters must be the model's {len(params)} "
                         "trainable parameters in order (its layer keys are their positions): build it over "
                         "[p for p in model.parameters() if p.requires_grad]")  # fmt: skip
    return controller.gradients, controller.observe


def enable_gradient_release(model: torch.nn.Module, optimizer: CodecOptimizer, compressor=None, observer=None,
                            controller=None) -> GradientRelease:  # fmt: skip
    """Step ``optimizer`` per parameter during ``backward()`` and free each gradient; see the module doc.
    ``compressor`` (default None) compresses each gradient before its step, with its error feedback;
    ``observer`` / ``controller`` (default None) as ``GradientRelease``'s."""
    return GradientRelease(model, optimizer, compressor, observer=observer, controller=controller)
