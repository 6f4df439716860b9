"""Training memory per parameter: weights + gradients + optimizer states + weight corrections.

``training_bytes(model, optimizer)`` counts tensors, not estimates:

- ``params``: bytes of the model's parameters (each storage once).
- ``grads``: gradient bytes at the step's peak. Without gradient release every trainable parameter's
  gradient exists at ``optimizer.step()`` (same dtype and size as the parameter); with gradient release
  (``enable_gradient_release``) a gradient lives only until its parameter is stepped, so the figure is the
  largest single gradient — a lower bound of what autograd holds at once, stated as such in the docs.
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


def training_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Bytes of params, grads (at the step's peak), states and corrections; see the module doc."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    grad_sizes = [p.numel() * p.element_size() for p in trainable]
    released = getattr(optimizer, "_release", None) is not None
    rows = state_breakdown(optimizer)
    is_correction = lambda key: key.split(".")[0] in correction_keys()  # noqa: E731
    out = {
        "params": _storage_bytes(params),
        "grads": (max(grad_sizes, default=0) if released else sum(grad_sizes)),
        "states": sum(r["nbytes"] for r in rows if not is_correction(r["key"])),
        "corrections": sum(r["nbytes"] for r in rows if is_correction(r["key"])),
        "gradient_release": released,
    }
    out["total"] = out["params"] + out["grads"] + out["states"] + out["corrections"]
    out["per_param"] = out["total"] / max(1, sum(p.numel() for p in params))
    return out
