"""Sharpness: the top eigenvalue of the loss Hessian by power iteration on Hessian-vector products.

``hessian_top_eigenvalue(loss_fn, params)`` never forms the Hessian: each iteration is one
Hessian-vector product ``H v = d/dθ (∇L(θ) · v)`` (double backward through the graph of ``∇L``), so it
costs about two backward passes and memory for one extra copy of the gradients. Power iteration
converges to the eigenvalue of largest *magnitude*; near a minimum of a training loss that is the top
(positive) curvature, the usual "sharpness". The returned value keeps its sign.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch


def hessian_vector_product(grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor], v: Sequence[torch.Tensor]):
    """``H v`` from gradients built with ``create_graph=True``."""
    return torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True, allow_unused=True)


def hessian_top_eigenvalue(
    loss_fn: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    *,
    iters: int = 20,
    tol: float = 1e-3,
    seed: int = 0,
) -> dict:
    """Largest-magnitude Hessian eigenvalue of ``loss_fn()`` with respect to ``params``.

    Args:
        loss_fn: computes the scalar loss from ``params`` (called once, with gradients enabled).
        params: tensors requiring grad (the model's parameters, or stand-ins used by ``loss_fn``).
        iters: maximum power iterations (each one Hessian-vector product).
        tol: stop when the eigenvalue estimate changes by less than ``tol`` relative.
        seed: seed of the random start vector.

    Returns:
        ``{"eigenvalue", "iterations", "converged", "residual"}`` where ``residual = ||Hv - λv||`` for the
        final unit vector ``v`` (small when converged).
    """
    params = [p for p in params if p.requires_grad]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.enable_grad():
        loss = loss_fn()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        v = [torch.randn(p.shape, generator=gen, dtype=torch.float32).to(device=p.device, dtype=p.dtype) for p in params]
        norm = math.sqrt(sum(float((x * x).sum()) for x in v))
        v = [x / norm for x in v]
        eig, converged, it = 0.0, False, 0
        hv, v_used = None, v
        for it in range(1, iters + 1):
            v_used = v
            hv = [h if h is not None else torch.zeros_like(p) for h, p in zip(hessian_vector_product(grads, params, v), params)]
            new = sum(float((h * x).sum()) for h, x in zip(hv, v))
            hnorm = math.sqrt(sum(float((h * h).sum()) for h in hv))
            if hnorm == 0:
                eig = 0.0
                converged = True
                break
            done = it > 1 and abs(new - eig) <= tol * max(abs(new), 1e-12)
            eig = new
            v_next = [h / hnorm for h in hv]
            if done:
                converged = True
                break
            v = v_next
        residual = math.sqrt(sum(float(((h - eig * x) ** 2).sum()) for h, x in zip(hv, v_used))) if hv is not None else None
    return {"eigenvalue": eig, "iterations": it, "converged": converged, "residual": residual}
