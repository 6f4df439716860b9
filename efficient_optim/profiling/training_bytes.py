"""Training memory per parameter: weights + gradients + optimizer states + weight corrections.

``training_bytes(model, optimizer)`` counts tensors, not estimates:

- ``params``: bytes of the model's parameters (each storage once).
- ``grads``: gradient bytes at the step's peak. Without gradient release every trainable parameter's
  gradient exists at ``optimizer.step()`` (same dtype and size as the parameter); with gradient release
  (``enable_gradient_release``) a gradient lives only until its parameter is stepped, so the figure is the
  largest single gradient — a lower bound of what autograd holds at once, stated as such in the docs —
  plus the release compressor's residuals if it has one. With compressed accumulation
  (``accumulator=``, an ``efficient_optim.compress.GradAccumulator``) it is the accumulator's figure: its
  compressed buffers + residuals + the full gradients alive at the step (``GradAccumulator.gradient_bytes``).
- ``grad_buffers``: the part of ``grads`` held compressed (accumulation buffers, residuals).
- ``states``: ``state_bytes(optimizer)`` without the weight-correction buffers.
- ``corrections``: the master-weight corrections (``weight_correction``, ``weight_kahan``).
- ``total`` and ``per_param`` (total / number of parameters).
"""

from __future__ import annotations

import torch

from ..optim.master_weights import correction_keys
from .state_bytes import state_breakdown


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.device) if t.untyped_storage().data_ptr() else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def training_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer, accumulator=None) -> dict:
    """Bytes of params, grads (at the step's peak), states and corrections; see the module doc.
    ``accumulator``: the ``GradAccumulator`` the gradients go through (default None: plain ``p.grad``)."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    grad_sizes = [p.numel() * p.element_size() for p in trainable]
    release = getattr(optimizer, "_release", None)
    released = release is not None
    if accumulator is not None:
        accumulated = accumulator.gradient_bytes()
        grad_buffers, grads = accumulated["buffers"] + accumulated["state"], accumulated["total"]
    else:
        grad_buffers = getattr(release, "compressor_state_nbytes", int)()  # release's residuals, if compressed
        grads = (max(grad_sizes, default=0) if released else sum(grad_sizes)) + grad_buffers
    rows = state_breakdown(optimizer)
    is_correction = lambda key: key.split(".")[0] in correction_keys()  # noqa: E731
    out = {
        "params": _storage_bytes(params),
        "grads": grads,
        "grad_buffers": grad_buffers,
        "states": sum(r["nbytes"] for r in rows if not is_correction(r["key"])),
        "corrections": sum(r["nbytes"] for r in rows if is_correction(r["key"])),
        "gradient_release": released,
    }
    out["total"] = out["params"] + out["grads"] + out["states"] + out["corrections"]
    out["per_param"] = out["total"] / max(1, sum(p.numel() for p in params))
    return out
