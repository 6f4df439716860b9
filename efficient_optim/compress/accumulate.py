"""Compressed gradient accumulation: micro-batch gradients summed in compressed buffers, not in ``p.grad``.

Plain accumulation keeps every ``p.grad`` alive across the micro-batches: one full-precision gradient per
parameter. Here a hook (``register_post_accumulate_grad_hook``) folds each parameter's gradient into its
compressed buffer as soon as autograd has it, and frees it:

    buffer_p <- C(decode(buffer_p) + g_p + e_p)       e_p <- R(what that compression lost)

``C`` is the compressor and ``e`` the error-feedback residual kept by an ``ErrorFeedback`` (in ``R``, 8 bits
by default), which carries what is lost to the next micro-batch and across optimizer steps. Between
micro-batches the gradient memory is the buffers and residuals (e.g. 1.03 + 1.06 B per element at 8 bits
instead of 4 B), plus the one gradient autograd is producing.

    acc = GradAccumulator(model, ErrorFeedback(Quantize(8)))
    for batches in data:
        for micro in batches:
            (model(micro).loss / len(batches)).backward()    # folded into the buffers
        acc.step(optimizer, max_norm=1.0)   # decode, clip, step and free one parameter at a time
    acc.remove()

``step`` needs an optimizer that steps one parameter (this library's: ``step_param``); the global norm for
clipping is computed from the buffers first. With any other optimizer, ``finish()`` writes every ``p.grad``
and ``optimizer.step()`` runs as usual, but then all full gradients exist at the step: the saving holds only
between micro-batches, not at the step's peak.

A non-finite gradient is not folded in (that parameter's buffer and residual stay finite); the step is
skipped (``step``) or the parameter's ``p.grad`` is written as NaN (``finish``) so the optimizer's own
non-finite policy applies. The skipped step's buffers are dropped; what its finite micro-batches left in the
residuals (one rounding error each) is kept.
"""

from __future__ import annotations

import warnings

import torch

from .base import Compressor
from .dgc import DGC
from .feedback import GradientCompressor, as_gradient_compressor


class GradAccumulator:
    """Accumulate each parameter's gradient in a compressed buffer (see the module doc).

    Args:
        model: the module whose trainable parameters are accumulated (or an iterable of parameters).
        compressor: a ``GradientCompressor`` (e.g. ``ErrorFeedback(Quantize(8))``) or a plain ``Compressor``
            (then no error feedback: what each re-compression loses is lost). ``DGC`` is refused: it applies
            its momentum once per optimizer step, not per micro-batch.
        observer: called as ``observer(key, grad)`` with each accumulated gradient (float32, before clipping)
            when ``step``/``finish`` decodes it, e.g. a controller's ``observe`` (default None).
    """

    def __init__(self, model, compressor: GradientCompressor | Compressor, observer=None):
        gc = as_gradient_compressor(compressor)
        if isinstance(gc, DGC):
            raise ValueError("DGC accumulates momentum once per optimizer step; use it with gradient release or the "
                             "DDP hook, and accumulate with ErrorFeedback(TopK(...)) instead")  # fmt: skip
        params = model.parameters() if isinstance(model, torch.nn.Module) else model
        seen, self.params = set(), []
        for p in params:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                self.params.append(p)
        if not self.params:
            raise ValueError("GradAccumulator: no trainable parameters")
        self.compressor = gc
        self.observer = observer
        self.buffers: dict = {}  # key (parameter position) -> Payload of the running sum
        self.nonfinite: set = set()
        self.skipped_steps = 0
        self.last_mode: str | None = None  # "step" (one parameter at a time) or "finish" (all p.grad)
        self._hooks = [p.register_post_accumulate_grad_hook(self._make_hook(i)) for i, p in enumerate(self.params)]

    def _make_hook(self, key: int):
        def hook(param: torch.Tensor) -> None:
            self.fold(key, param)

        return hook

    @torch.no_grad()
    def fold(self, key: int, param: torch.Tensor) -> None:
        """Add ``param.grad`` to parameter ``key``'s buffer and free it (what the hook does)."""
        grad = param.grad
        if grad is None:
            return
        param.grad = None
        if key in self.nonfinite or not bool(torch.isfinite(grad).all()):
            self.nonfinite.add(key)
            return
        total = grad.reshape(-1).to(torch.float32)
        if key in self.buffers:
            total = total + self.compressor.decompress(key, self.buffers[key]).reshape(-1)
        self.buffers[key] = self.compressor.compress(key, total)

    def gradient(self, key: int) -> torch.Tensor | None:
        """The accumulated gradient of parameter ``key`` (float32, its shape), or None if it has none."""
        if key not in self.buffers:
            return None
        return self.compressor.decompress(key, self.buffers[key]).view(self.params[key].shape)

    def _observed(self, key: int) -> torch.Tensor:
        grad = self.gradient(key)
        if self.observer is not None:
            self.observer(key, grad)
        return grad

    def _clear(self) -> None:
        self.buffers, self.nonfinite = {}, set()

    @torch.no_grad()
    def finish(self) -> None:
        """Write every accumulated gradient into ``p.grad`` (the parameter's dtype; NaN for a non-finite one)
        and empty the buffers; then call ``optimizer.step()`` as usual."""
        for key, p in enumerate(self.params):
            if key in self.nonfinite:
                p.grad = torch.full_like(p, float("nan"))
            elif key in self.buffers:
                p.grad = self._observed(key).to(p.dtype)
        self._clear()
        self.last_mode = "finish"

    @torch.no_grad()
    def step(self, optimizer, max_norm: float = 0.0) -> float:
        """Step ``optimizer`` one parameter at a time from the buffers; returns the gradients' global norm.

        Args:
            optimizer: an optimizer with ``step_param(param)`` (this library's optimizers).
            max_norm: clip the global gradient norm to this (computed from the buffers first); 0 = off (default).

        A non-finite gradient skips the whole step (``skipped_steps`` counts it; a ``RuntimeWarning`` says so).
        """
        step_param = getattr(optimizer, "step_param", None)
        if step_param is None:
            raise TypeError(f"GradAccumulator.step needs an optimizer that steps one parameter (step_param), as "
                            f"efficient_optim's do; {type(optimizer).__name__} does not: use finish() and "
                            "optimizer.step()")  # fmt: skip
        if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or max_norm < 0:
            raise ValueError(f"max_norm must be a number >= 0, got {max_norm!r}")
        self.last_mode = "step"
        if self.nonfinite:
            self.skipped_steps += 1
            warnings.warn("GradAccumulator: a gradient contained NaN or Inf; the step was skipped", RuntimeWarning,
                          stacklevel=2)  # fmt: skip
            self._clear()
            return float("nan")
        coef, norm = 1.0, None
        if max_norm > 0:
            norm = sum(float(self.gradient(k).pow(2).sum()) for k in self.buffers) ** 0.5
            coef = min(1.0, max_norm / (norm + 1e-6))
        squares = 0.0
        for key, p in enumerate(self.params):
            if key not in self.buffers:
                continue
            grad = self._observed(key)
            squares += float(grad.pow(2).sum()) if norm is None else 0.0
            p.grad = (grad * coef if coef < 1.0 else grad).to(p.dtype)
            del self.buffers[key]
            step_param(p)
            p.grad = None
        optimizer._opt_called = True  # as gradient release: LR schedulers check this flag
        self._clear()
        return norm if norm is not None else squares**0.5

    def gradient_bytes(self, mode: str | None = None) -> dict:
        """Gradient memory at the step's peak, in bytes.

        Args:
            mode: ``"step"`` (one parameter decoded at a time) or ``"finish"`` (every ``p.grad`` written);
                default: the mode of the last step, ``"finish"`` before any (the larger figure).

        Returns ``buffers`` (compressed sums, all parameters), ``state`` (residuals etc.), ``gradients`` (full
        gradients alive at once: the largest one, or all of them) and ``total``.
        """
        mode = mode or self.last_mode or "finish"
        if mode not in ("step", "finish"):
            raise ValueError(f"mode must be 'step' or 'finish', got {mode!r}")
        sizes = [p.numel() * p.element_size() for p in self.params]
        out = {
            "buffers": sum(self.compressor.compressor_for(k).nbytes(p.numel()) for k, p in enumerate(self.params)),
            "state": self.compressor.state_nbytes(),
            "gradients": max(sizes) if mode == "step" else sum(sizes),
            "mode": mode,
        }
        out["total"] = out["buffers"] + out["state"] + out["gradients"]
        return out

    def state_dict(self) -> dict:
        """The compressor's state (residuals): save it with the model and optimizer to resume exactly."""
        if self.buffers:
            raise RuntimeError("GradAccumulator.state_dict: micro-batches are pending; save after step()/finish()")
        return {"compressor": self.compressor.state_dict(), "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.compressor.load_state_dict(state["compressor"])
        self.skipped_steps = int(state.get("skipped_steps", 0))

    def remove(self) -> None:
        """Remove the hooks: gradients accumulate in ``p.grad`` again."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
