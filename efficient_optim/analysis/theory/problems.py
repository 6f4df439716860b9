"""Problems with a known optimum, for convergence checks of any optimizer.

Each problem has one ``n x n`` float32 parameter matrix (``n = 64``: 4096 elements, so the library's
optimizers quantize and factor it as they would a layer; smaller tensors stay dense by default), a float64
optimum ``x_star`` and optimal value ``f_star``, the loss in float64 and the gradient the optimizer sees,
computed in float32 like a model's would be. Every problem is strongly convex, so its minimizer is unique:

- ``quadratic``: ``f(W) = 1/2 tr((W - W*)^T A (W - W*))`` with ``A = Q diag(lam) Q^T``, ``lam`` log-spaced
  from ``1/kappa`` to 1 and ``Q`` a random rotation (so an axis-aligned preconditioner such as Adam's does not
  solve it in one step). ``f* = 0``, ``mu = 1/kappa``, ``L = 1``.
- ``least_squares``: ``f(W) = 1/(2N) ||X W - Y||^2`` with a Gaussian design whose covariance has condition
  number ``kappa`` and noisy targets, so ``f* > 0`` and the gradient at the optimum is only zero in exact
  arithmetic (its float32 evaluation has a rounding-error floor). ``W*`` by a float64 least-squares solve.
- ``logistic``: multinomial logistic regression (``n`` features, ``n`` classes, labels drawn from a planted
  softmax model) with an L2 penalty ``reg/2 ||W||^2``: strongly convex with ``mu >= reg``, hence PL.
  ``W*`` by float64 L-BFGS to a gradient norm below 1e-10.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

PROBLEM_NAMES = ("quadratic", "least_squares", "logistic")


@dataclass
class Problem:
    """A problem with a known optimum.

    Args:
        name: short name (``quadratic``, ``least_squares``, ``logistic``, with settings, e.g. ``quadratic-k100``).
        description: one line for reports.
        x0: float32 starting point (the optimizers train a copy of it).
        x_star: float64 optimum.
        f_star: optimal value (float64).
        loss: ``loss(x)`` -> float, evaluated in float64 at a float32 point.
        grad: ``grad(x)`` -> float32 gradient at a float32 point (computed in float32).
        mu, L: strong-convexity and smoothness constants (the extreme Hessian eigenvalues at the optimum).
    """

    name: str
    description: str
    x0: torch.Tensor
    x_star: torch.Tensor
    f_star: float
    loss: Callable[[torch.Tensor], float]
    grad: Callable[[torch.Tensor], torch.Tensor]
    mu: float
    L: float

    @property
    def kappa(self) -> float:
        return self.L / self.mu


def _rotation(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def _spectrum(n: int, kappa: float) -> torch.Tensor:
    return torch.logspace(0.0, -math.log10(kappa), n, dtype=torch.float64)


def _check(n: int, kappa: float) -> None:
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an integer >= 2, got {n!r}")
    if not kappa >= 1:
        raise ValueError(f"kappa (the condition number) must be >= 1, got {kappa!r}")


def quadratic(n: int = 64, kappa: float = 100.0, seed: int = 0) -> Problem:
    """The rotated quadratic with condition number ``kappa`` (args: matrix side ``n`` (default 64), ``kappa``
    (default 100), ``seed`` of the rotation and the optimum (default 0)). Starts at 0; ``W*`` is N(0, 1)."""
    _check(n, kappa)
    gen = torch.Generator().manual_seed(seed)
    q = _rotation(n, gen)
    lam = _spectrum(n, kappa)
    a64 = (q * lam) @ q.T
    a32 = a64.float()
    x_star = torch.randn(n, n, generator=gen, dtype=torch.float64)
    xs32 = x_star.float()

    def loss(x):
        d = x.double() - x_star
        return 0.5 * float((d * (a64 @ d)).sum())

    def grad(x):
        return a32 @ (x.float() - xs32)

    return Problem(f"quadratic-k{kappa:g}", f"rotated quadratic, n={n}x{n}, condition number {kappa:g}",
                   torch.zeros(n, n), x_star, 0.0, loss, grad, float(lam.min()), float(lam.max()))  # fmt: skip


def least_squares(n: int = 64, samples: int = 256, kappa: float = 100.0, noise: float = 0.1, seed: int = 0) -> Problem:
    """Noisy least squares (args: ``n`` features and outputs (default 64), ``samples`` N (default 256), ``kappa``:
    condition number of the design covariance ``X^T X / N`` (default 100), ``noise``: std of the target
    noise (default 0.1), ``seed`` (default 0)). Starts at 0."""
    _check(n, kappa)
    if samples < n:
        raise ValueError(f"samples must be >= n ({n}) for a unique least-squares solution, got {samples}")
    gen = torch.Generator().manual_seed(seed)
    u = _rotation(samples, gen)[:, :n]
    v = _rotation(n, gen)
    x64 = math.sqrt(samples) * (u * _spectrum(n, kappa).sqrt()) @ v.T  # X^T X / N = V diag(lam) V^T
    w_true = torch.randn(n, n, generator=gen, dtype=torch.float64)
    y64 = x64 @ w_true + noise * torch.randn(samples, n, generator=gen, dtype=torch.float64)
    x_star = torch.linalg.lstsq(x64, y64).solution
    f_star = 0.5 * float(((x64 @ x_star - y64) ** 2).sum()) / samples
    x32, y32 = x64.float(), y64.float()
    h = x64.T @ x64 / samples
    eig = torch.linalg.eigvalsh(h)

    def loss(w):
        return 0.5 * float(((x64 @ w.double() - y64) ** 2).sum()) / samples

    def grad(w):
        return x32.T @ (x32 @ w.float() - y32) / samples

    return Problem(f"least_squares-k{kappa:g}", f"least squares, {samples} samples x {n} features -> {n} outputs, "
                   f"condition number {kappa:g}, target noise {noise:g}", torch.zeros(n, n), x_star, f_star, loss, grad,
                   float(eig.min()), float(eig.max()))  # fmt: skip


def _logistic_parts(x: torch.Tensor, labels: torch.Tensor, reg: float):
    n_samples = x.shape[0]

    def value(w: torch.Tensor) -> torch.Tensor:
        logits = x.to(w.dtype) @ w
        return torch.nn.functional.cross_entropy(logits, labels, reduction="sum") / n_samples + 0.5 * reg * (w * w).sum()

    return value


def _hvp(value, w: torch.Tensor):
    """``(g, hv)``: the gradient at ``w`` and a function giving Hessian-vector products there."""
    w = w.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(value(w), w, create_graph=True)
    return g.detach(), lambda v: torch.autograd.grad(g, w, grad_outputs=v, retain_graph=True)[0]


def _solve_logistic(value, n: int, tol: float = 1e-10) -> torch.Tensor:
    """float64 L-BFGS, then Newton steps (conjugate gradients on Hessian-vector products) to ``tol``."""
    w = torch.zeros(n, n, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=300, tolerance_grad=tol, tolerance_change=0.0,
                            history_size=50, line_search_fn="strong_wolfe")  # fmt: skip

    def closure():
        opt.zero_grad()
        f = value(w)
        f.backward()
        return f

    opt.step(closure)
    w = w.detach()
    for _ in range(5):
        g, hv = _hvp(value, w)
        if float(g.norm()) < tol:
            return w
        d, r = torch.zeros_like(g), -g  # conjugate gradients on H d = -g
        p, rr = r.clone(), float((r * r).sum())
        for _ in range(200):
            hp = hv(p)
            alpha = rr / float((p * hp).sum())
            d, r = d + alpha * p, r - alpha * hp
            rr_new = float((r * r).sum())
            if rr_new**0.5 < 1e-3 * tol:
                break
            p, rr = r + (rr_new / rr) * p, rr_new
        w = w + d
    gnorm = float(_hvp(value, w)[0].norm())
    if gnorm >= tol:
        raise RuntimeError(f"the logistic-regression optimum was not found to gradient norm {tol:g} (got {gnorm:.2g})")
    return w


def _top_hessian_eigenvalue(value, at: torch.Tensor, gen: torch.Generator, iters: int = 100) -> float:
    _, hv = _hvp(value, at)
    v = torch.randn(at.shape, generator=gen, dtype=at.dtype)
    eig = 0.0
    for _ in range(iters):
        v = v / v.norm()
        h = hv(v)
        eig = float((h * v).sum())
        v = h
    return eig


def logistic(n: int = 64, samples: int = 512, reg: float = 1e-2, seed: int = 0) -> Problem:
    """L2-regularized multinomial logistic regression (args: ``n`` features and classes (default 64),
    ``samples`` (default 512), ``reg``: the L2 penalty, also the strong-convexity constant (default 1e-2),
    ``seed`` (default 0)). Starts at 0."""
    _check(n, 1.0)
    if not reg > 0:
        raise ValueError(f"reg must be > 0 (without it the optimum may not exist), got {reg!r}")
    gen = torch.Generator().manual_seed(seed)
    x64 = torch.randn(samples, n, generator=gen, dtype=torch.float64)
    w_true = 2.0 * torch.randn(n, n, generator=gen, dtype=torch.float64) / math.sqrt(n)
    labels = torch.multinomial(torch.softmax(x64 @ w_true, dim=1), 1, generator=gen).squeeze(1)
    value = _logistic_parts(x64, labels, reg)
    x_star = _solve_logistic(value, n)
    f_star = float(value(x_star))
    x32 = x64.float()
    # mu = reg exactly: the data term is flat along W -> W + c 1^T (the same vector added to every class's
    # column leaves the softmax unchanged). L by power iteration on Hessian-vector products at the optimum.
    l_max = _top_hessian_eigenvalue(value, x_star, gen)

    def loss(w):
        with torch.no_grad():
            return float(value(w.double()))

    def grad(w):
        w = w.detach().float().requires_grad_(True)
        with torch.enable_grad():
            logits = x32 @ w
            f = torch.nn.functional.cross_entropy(logits, labels, reduction="sum") / samples + 0.5 * reg * (w * w).sum()
            (g,) = torch.autograd.grad(f, w)
        return g

    return Problem(f"logistic-reg{reg:g}", f"multinomial logistic regression, {samples} samples, {n} features, {n} classes, "
                   f"L2 penalty {reg:g}", torch.zeros(n, n), x_star, f_star, loss, grad, reg, l_max)  # fmt: skip


def build_problem(name: str, kappa: float = 100.0, seed: int = 0) -> Problem:
    """``quadratic`` / ``least_squares`` (with condition number ``kappa``) or ``logistic`` (its own conditioning)."""
    if name == "quadratic":
        return quadratic(kappa=kappa, seed=seed)
    if name == "least_squares":
        return least_squares(kappa=kappa, seed=seed)
    if name == "logistic":
        return logistic(seed=seed)
    raise ValueError(f"unknown problem {name!r}; choose one of {', '.join(PROBLEM_NAMES)}")
