"""``TrainingBudget``: a hard limit on a controller's training memory, enforced by projection.

The memory a controller's choices decide is

    M = M_grad + M_momentum + M_params (+ M_controller)

- ``M_grad``: per layer, the compressed gradient buffer (its compressor's exact ``nbytes``) plus the state its
  ``GradientCompressor`` keeps between steps: the error-feedback residual (``ErrorFeedback``: the residual
  compressor's ``nbytes``), DGC's two fp32 buffers, nothing for ``NoFeedback``. This is what
  ``GradAccumulator`` holds and what ``efficient_optim.training_bytes(..., accumulator=)`` reports as
  ``grad_buffers`` once every layer has a residual (tested equal). Without a ``GradientCompressor`` the layer's
  gradient is a plain ``p.grad`` (its numel times its element size) and the choice's gradient spec changes
  nothing.
- ``M_momentum``: the momentum state's exact bytes under the chosen spec: the optimizer's own codec for it
  (``optimizer.resolve_spec``, i.e. ``policy.specs.resolve_codec`` with the parameter group's options, the
  small-tensor rule included) sized by ``codec.expected`` (``policy.budget.codec_bytes``), what
  ``state_bytes`` counts for that state. Without an optimizer it is 0 (the momentum is not controlled). The
  optimizer's other states (Adam's second moment) are not in M: no choice changes them;
  ``breakdown`` does not count them either. Shared quantization tables (one small map per codec, shared by
  every parameter) are not counted.
- ``M_params``: the parameters' bytes (fixed).
- ``M_controller``: what the controller itself keeps for its features (``Controller.nbytes``: the sampled
  parameter samples of the curvature feature, at most 2 KiB per layer), fixed, counted so nothing is hidden.

``project(choices, controller, sensitivity)`` returns choices whose M fits the limit (HAQ's projection, Wang
et al. 2019): while M exceeds it, the layer with the lowest ``sensitivity x (1 + steps it was lowered)`` is
lowered one menu step (so insensitive layers go first, and no layer takes every step). A step lowers the
gradient spec (the next lower bits at the same kept fraction, or the next lower kept fraction that is cheaper
at the same bits; an off-menu spec goes to the most expensive cheaper menu spec) or the momentum spec (the
next cheaper of ``menu.MOMENTUM_SPECS``), whichever saves fewer bytes (the gentlest step). Choices already
within the limit are returned unchanged. When even the cheapest choices cannot fit, a ``ValueError`` names
the limit and that minimum, before anything changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from functools import lru_cache, wraps

from ..policy.budget import codec_bytes
from .choice import LayerChoice
from .dgc import DGC
from .feedback import ErrorFeedback, NoFeedback
from .menu import GRAD_BITS, GRAD_SPECS, KEEP_FRACTIONS, MOMENTUM_SPECS, grad_spec, indices_of
from .specs import parse_compressor

_MEMO: ContextVar[dict | None] = ContextVar("efficient_optim_budget_memo", default=None)


@contextlib.contextmanager
def _memoized() -> Iterator[None]:
    """Within one projection or byte count, each layer's bytes under each spec are computed once (nothing they
    depend on changes during the call; a projection asked for them thousands of times)."""
    token = _MEMO.set({}) if _MEMO.get() is None else None
    try:
        yield
    finally:
        if token is not None:
            _MEMO.reset(token)


def _per_call_cache(fn):
    @wraps(fn)
    def cached(controller, key: int, spec: str | None = None) -> int:
        memo = _MEMO.get()
        if memo is None:
            return fn(controller, key, spec)
        k = (fn.__name__, id(controller), key, spec)
        if k not in memo:
            memo[k] = fn(controller, key, spec)
        return memo[k]

    return cached


def accountable(gradients) -> bool:
    """Whether the per-layer state of ``gradients`` (a ``GradientCompressor`` or None) can be sized exactly."""
    return gradients is None or isinstance(gradients, (ErrorFeedback, DGC, NoFeedback))


def feedback_bytes(gradients, numel: int) -> int:
    """Bytes a ``GradientCompressor`` keeps for one tensor of ``numel`` elements between calls."""
    if isinstance(gradients, ErrorFeedback):
        return gradients.residual_compressor.nbytes(numel)
    if isinstance(gradients, DGC):
        return 8 * numel  # velocity and accumulation, fp32 each
    if isinstance(gradients, NoFeedback):
        return 0
    raise ValueError(f"TrainingBudget cannot size the state of {type(gradients).__name__}; use ErrorFeedback, "
                     "NoFeedback or DGC")  # fmt: skip


@lru_cache(maxsize=4096)
def spec_nbytes(spec: str, numel: int) -> int:
    """Exact payload bytes of the compressor ``spec`` names for ``numel`` elements (cached)."""
    return parse_compressor(spec).nbytes(numel)


def grad_controlled(controller) -> bool:
    """Whether a choice's gradient spec changes anything (DGC sets its own kept fraction)."""
    return controller.gradients is not None and not isinstance(controller.gradients, DGC)


@_per_call_cache
def grad_bytes(controller, key: int, spec: str | None = None) -> int:
    """``M_grad`` of layer ``key`` under gradient ``spec`` (None: its compressor now); see the module doc."""
    p = controller.params[key]
    n, g = p.numel(), controller.gradients
    if g is None:
        return n * p.element_size()
    if spec is None or not grad_controlled(controller):
        return g.compressor_for(key).nbytes(n) + feedback_bytes(g, n)
    return spec_nbytes(spec, n) + feedback_bytes(g, n)


def group_of(optimizer, param) -> dict:
    """The param group holding ``param`` (``KeyError`` if the optimizer does not handle it)."""
    for group in optimizer.param_groups:
        if any(q is param for q in group["params"]):
            return group
    raise KeyError("the parameter is not handled by the controller's optimizer")


@_per_call_cache
def momentum_bytes(controller, key: int, spec: str | None = None) -> int:
    """``M_momentum`` of layer ``key`` under momentum ``spec`` (None: its current or requested spec, else the
    optimizer's plan or policy); 0 without an optimizer or a momentum state."""
    opt, name = controller.optimizer, controller.momentum_state
    if opt is None:
        return 0
    p = controller.params[key]
    group = group_of(opt, p)
    if spec is None:
        spec = controller.current.get(key, LayerChoice()).momentum
    if spec is None:
        if any(q is p for q in opt.planned_params()):
            codec = opt.plan_of(p).get(name)
        else:
            chosen = opt.policy_choice(p).get(name)
            codec = None if chosen is None else opt.resolve_spec(name, chosen, p, group)
        return 0 if codec is None else codec_bytes(codec, name, p)
    if name not in opt.default_specs(p, group):
        return 0
    return codec_bytes(opt.resolve_spec(name, spec, p, group), name, p)


def fixed_bytes(controller) -> dict:
    """The parts of M no choice changes: ``params`` (each storage once) and ``controller`` (its snapshots)."""
    seen, params = set(), 0
    for p in controller.params:
        if id(p) not in seen:
            seen.add(id(p))
            params += p.numel() * p.element_size()
    return {"params": params, "controller": controller.nbytes()}


class TrainingBudget:
    """A hard limit on a controller's training memory M (see the module doc). Give ``Controller(budget=)``.

    Args:
        bytes: the limit in bytes.
        bytes_per_param: the limit per parameter element of the controller's parameters (e.g. 6.0: fp32
            params 4 + gradient and momentum 2); give exactly one of the two.
    """

    def __init__(self, bytes: int | None = None, bytes_per_param: float | None = None):
        if (bytes is None) == (bytes_per_param is None):
            raise ValueError("TrainingBudget: give exactly one of bytes= or bytes_per_param=")
        for what, value in (("bytes", bytes), ("bytes_per_param", bytes_per_param)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ValueError(f"TrainingBudget: invalid {what}: {value!r} (a number > 0)")
        self.bytes, self.bytes_per_param = bytes, bytes_per_param

    def __repr__(self) -> str:
        size = f"bytes={self.bytes}" if self.bytes is not None else f"bytes_per_param={self.bytes_per_param}"
        return f"TrainingBudget({size})"

    def limit(self, controller) -> int:
        """The limit in bytes for ``controller``'s parameters."""
        if self.bytes is not None:
            return int(self.bytes)
        return int(self.bytes_per_param * sum(p.numel() for p in controller.params))

    def breakdown(self, choices: dict, controller) -> dict:
        """``grad``, ``momentum``, ``params``, ``controller`` and ``total`` bytes of M under ``choices``
        (position -> ``LayerChoice``; a layer left out, or a None part, keeps its current setting)."""
        with _memoized():
            return self._breakdown(choices, controller)

    def _breakdown(self, choices: dict, controller) -> dict:
        grad = momentum = 0
        for key in range(len(controller.params)):
            choice = choices.get(key) or LayerChoice()
            grad += grad_bytes(controller, key, choice.grad)
            momentum += momentum_bytes(controller, key, choice.momentum)
        out = {"grad": grad, "momentum": momentum, **fixed_bytes(controller)}
        out["total"] = grad + momentum + out["params"] + out["controller"]
        return out

    def training_bytes(self, choices: dict, controller) -> int:
        """Exact M (bytes) under ``choices`` (see ``breakdown``)."""
        return self.breakdown(choices, controller)["total"]

    def minimum_bytes(self, controller, choices: dict | None = None) -> int:
        """The smallest M projection can reach from ``choices`` (default: the current settings): every layer
        at its cheapest menu option (or its own choice where that is cheaper)."""
        with _memoized():
            return self._minimum_bytes(controller, choices or {})

    def _minimum_bytes(self, controller, choices: dict) -> int:
        total = sum(fixed_bytes(controller).values())
        for key in range(len(controller.params)):
            choice = choices.get(key) or LayerChoice()
            g = grad_bytes(controller, key, choice.grad)
            if grad_controlled(controller):
                g = min(g, *(grad_bytes(controller, key, s) for s in GRAD_SPECS))
            m = momentum_bytes(controller, key, choice.momentum)
            if controller.optimizer is not None:
                m = min(m, *(momentum_bytes(controller, key, s) for s in MOMENTUM_SPECS))
            total += g + m
        return total

    def check(self, controller, choices: dict | None = None) -> None:
        """``ValueError`` naming the limit and the minimum when even the cheapest choices cannot fit."""
        limit, floor = self.limit(controller), self.minimum_bytes(controller, choices)
        if floor > limit:
            n = sum(p.numel() for p in controller.params)
            raise ValueError(f"{self!r}: the limit of {limit} bytes cannot hold the training memory; the cheapest "
                             f"choices need at least {floor} bytes ({floor / max(n, 1):.3f} bytes per parameter)")  # fmt: skip

    def project(self, choices: dict, controller, sensitivity: dict | None = None) -> dict:
        """Choices whose M fits the limit (see the module doc).

        Args:
            choices: position -> ``LayerChoice`` (a layer left out keeps its current setting).
            controller: the ``Controller`` whose layers, compressors and optimizer size the choices.
            sensitivity: position -> how much an error in that layer costs (>= 0; default: the controller's
                ``sensitivity()``, each layer's share of the gradient norm).
        """
        with _memoized():
            return self._project(choices, controller, sensitivity)

    def _project(self, choices: dict, controller, sensitivity: dict | None) -> dict:
        limit = self.limit(controller)
        total = self.training_bytes(choices, controller)
        if total <= limit:
            return dict(choices)
        self.check(controller, choices)
        sens = controller.sensitivity() if sensitivity is None else sensitivity
        out = dict(choices)
        steps = dict.fromkeys(range(len(controller.params)), 0)
        best = {k: self._lower(controller, k, out.get(k) or LayerChoice()) for k in steps}
        while total > limit:
            movable = [k for k, b in best.items() if b is not None]
            if not movable:  # unreachable after check(); kept so a bug cannot loop forever
                raise RuntimeError(f"{self!r}: projection stalled at {total} bytes")
            key = min(movable, key=lambda k: (float(sens.get(k, 1.0)) * (1 + steps[k]), -best[k][1], k))
            choice, saving = best[key]
            out[key], total, steps[key] = choice, total - saving, steps[key] + 1
            best[key] = self._lower(controller, key, choice)
        return out

    @staticmethod
    def _lower(controller, key: int, choice: LayerChoice):
        """``(choice one step lower, bytes saved)`` for layer ``key``, or None at its cheapest."""
        steps = []
        if grad_controlled(controller):
            spec = choice.grad or controller.gradients.compressor_for(key).describe()
            now = grad_bytes(controller, key, choice.grad)
            for lower in _grad_steps(controller, key, spec, now):
                steps.append((now - grad_bytes(controller, key, lower), 0, LayerChoice(lower, choice.momentum)))
        if controller.optimizer is not None:
            now = momentum_bytes(controller, key, choice.momentum)
            cheaper = [s for s in MOMENTUM_SPECS if momentum_bytes(controller, key, s) < now]
            if cheaper:
                saving = now - momentum_bytes(controller, key, cheaper[-1])
                steps.append((saving, 1, LayerChoice(choice.grad, cheaper[-1])))
        if not steps:
            return None
        saving, _, lowered = min(steps, key=lambda s: (s[0], s[1]))
        return lowered, saving


def _grad_steps(controller, key: int, spec: str, now: int) -> list[str]:
    """The menu's gradient specs one step below ``spec`` that save bytes (see the module doc)."""
    size = {s: grad_bytes(controller, key, s) for s in GRAD_SPECS}
    try:
        b, k, _ = indices_of(LayerChoice(spec, MOMENTUM_SPECS[0]))
    except ValueError:  # off the menu: the most expensive cheaper menu spec
        cheaper = sorted((s for s in GRAD_SPECS if size[s] < now), key=lambda s: size[s])
        return cheaper[-1:]
    out = []
    below_bits = [grad_spec(GRAD_BITS[i], KEEP_FRACTIONS[k]) for i in range(b - 1, -1, -1)]
    below_keep = [grad_spec(GRAD_BITS[b], KEEP_FRACTIONS[j]) for j in range(k - 1, -1, -1)]
    for candidates in (below_bits, below_keep):
        out.extend(next(([s] for s in candidates if size[s] < now), []))
    if not out:  # no neighbour saves bytes (a tiny layer): any cheaper menu spec
        cheaper = sorted((s for s in GRAD_SPECS if size[s] < now), key=lambda s: size[s])
        out = cheaper[-1:]
    return out
