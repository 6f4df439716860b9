"""Controllers: every N steps, choose per layer how its gradient is compressed and how its momentum is stored.

A controller watches each layer's gradient (``observe(key, grad)``; ``GradAccumulator(observer=...)`` calls it
with every accumulated gradient), and every ``every`` steps turns per-layer features into a ``LayerChoice``
per layer, then applies it: the gradient compressor spec through ``GradientCompressor.set_compressor`` (its
residual is kept) and the momentum spec through the optimizer's policy, a ``ControllerPolicy``: a dynamic
policy, so the optimizer transcodes the state once before its next step (``set_plan``; ``state_bytes``
follows) and its checkpoints record the plans. Layers are keyed by their position in the parameter list, as
the accumulator and gradient release key them.

    params = list(model.parameters())
    opt = efficient_optim.AdamW(params, lr=1e-3, policy=ControllerPolicy())
    controller = AccordionController(params, gradients=ErrorFeedback(Quantize(8)), optimizer=opt)
    acc = GradAccumulator(params, controller.gradients, observer=controller.observe)
    for step in range(steps):
        ...micro-batches backward...
        acc.step(opt, max_norm=1.0)
        controller.step(step, total_steps=steps)

Kinds (one interface, ``decide(features, step)``):

- ``StaticController``: a fixed choice per layer (a dict, or a function of the layer).
- ``AccordionController``: Accordion's rule (Agarwal et al., MLSys 2021). A layer is in a *critical regime*
  when the mean norm of its gradient over the last window changed by at least ``threshold`` (relative) since
  the previous decision, during the first ``warmup_steps``, and right after the learning rate fell by at least
  ``lr_drop`` (relative); critical layers get the ``high`` choice (light compression), the others ``low``.

Features each decision sees (``features()``): ``norm`` (mean ||g|| over the window), ``norm_std``, ``progress``
(step / total steps), ``depth`` (position / (layers - 1)), ``numel``, ``ndim``, ``lr``. Every decision is kept
in ``history`` (step, learning rate, per-layer choices) so the phases can be drawn against the schedule.
Not built yet (docs/mango.md): cos(m, g) and curvature features, the budget projection and the learned policy.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import deque

import torch

from ..policy import Policy
from .choice import LayerChoice
from .feedback import GradientCompressor, as_gradient_compressor


class ControllerPolicy(Policy):
    """The optimizer's side of a controller: a dynamic policy that applies, before the optimizer's next step,
    the state specs a controller requests (``request``); otherwise the optimizer's settings decide. Build the
    optimizer with ``policy=ControllerPolicy()`` and give the optimizer to the controller."""

    dynamic = True

    def __init__(self):
        self.pending: dict[int, dict] = {}  # parameter index -> {state: spec}
        self._params: list = []

    def bind(self, optimizer) -> None:
        self._params = [p for g in optimizer.param_groups for p in g["params"]]

    def request(self, param: torch.Tensor, specs: dict) -> None:
        """Ask for ``param``'s states to take ``specs`` (state name -> spec) before the next step."""
        index = next((i for i, p in enumerate(self._params) if p is param), None)
        if index is None:
            raise KeyError("the parameter is not handled by this policy's optimizer")
        self.pending.setdefault(index, {}).update(specs)

    def replan(self, optimizer) -> list:
        out = [(self._params[i], specs) for i, specs in sorted(self.pending.items())]
        self.pending = {}
        return out

    def state_dict(self) -> dict:
        return {"pending": {i: dict(s) for i, s in self.pending.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.pending = {int(i): dict(s) for i, s in state.get("pending", {}).items()}


class Controller(ABC):
    """Chooses per-layer gradient compression and momentum storage every ``every`` steps (module doc).

    Args:
        params: the parameters (a list, or a module: its parameters), keyed by position.
        gradients: the ``GradientCompressor`` whose per-layer compressors it sets (or a ``Compressor``,
            wrapped without feedback; default None: gradients are not controlled).
        optimizer: the optimizer whose momentum plans it sets (built with ``policy=ControllerPolicy()``) and
            whose learning rate it reads (default None: momentum not controlled).
        momentum_state: the optimizer's name of the momentum state (default None: the state the optimizer
            stores as its first moment, ``"exp_avg"`` for AdamW/Lion, ``"momentum_buffer"`` for SGD).
        every: decide every this many steps (default 100; the first decision is at step 0).
        window: gradient norms kept per layer for the features (default 10).
    """

    def __init__(self, params, gradients=None, optimizer=None, momentum_state: str | None = None, every: int = 100,
                 window: int = 10):  # fmt: skip
        self.params = list(params.parameters() if isinstance(params, torch.nn.Module) else params)
        if not self.params:
            raise ValueError("a controller needs at least one parameter")
        for name, value in (("every", every), ("window", window)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if optimizer is not None and not isinstance(getattr(optimizer, "policy", None), ControllerPolicy):
            raise ValueError(f"the optimizer must be built with policy=ControllerPolicy() (an efficient_optim optimizer) "
                             f"for a controller to change its plans; got {type(optimizer).__name__} with policy "
                             f"{getattr(optimizer, 'policy', None)!r}")  # fmt: skip
        self.gradients: GradientCompressor | None = as_gradient_compressor(gradients) if gradients is not None else None
        if momentum_state is None:
            prefixes = getattr(optimizer, "STATE_PREFIX", {})
            momentum_state = next((k for k, v in prefixes.items() if v == "m"), "exp_avg")
        self.optimizer, self.momentum_state = optimizer, momentum_state
        self.every, self.window = every, window
        self.norms = {k: deque(maxlen=window) for k in range(len(self.params))}
        self.current: dict[int, LayerChoice] = {}
        self.history: list[dict] = []

    def observe(self, key: int, grad: torch.Tensor) -> None:
        """Record the norm of layer ``key``'s gradient (called once per step per layer)."""
        self.norms[key].append(float(grad.detach().float().norm()))

    def learning_rate(self) -> float | None:
        return None if self.optimizer is None else float(self.optimizer.param_groups[0]["lr"])

    def features(self, step: int, total_steps: int | None = None) -> dict[int, dict]:
        """Per-layer features at ``step`` (see the module doc); ``norm`` is NaN before any observation."""
        n, lr = len(self.params), self.learning_rate()
        out = {}
        for key, p in enumerate(self.params):
            norms = list(self.norms[key])
            mean = sum(norms) / len(norms) if norms else float("nan")
            std = math.sqrt(sum((x - mean) ** 2 for x in norms) / len(norms)) if norms else float("nan")
            out[key] = {"norm": mean, "norm_std": std, "progress": step / total_steps if total_steps else None,
                        "depth": key / max(1, n - 1), "numel": p.numel(), "ndim": p.ndim, "lr": lr}  # fmt: skip
        return out

    @abstractmethod
    def decide(self, features: dict[int, dict], step: int) -> dict[int, LayerChoice]:
        """The choice per layer (layers left out keep theirs)."""

    def step(self, step: int, total_steps: int | None = None) -> dict[int, LayerChoice] | None:
        """Decide and apply at every ``every``-th step (call after the optimizer step); the choices or None."""
        if step % self.every:
            return None
        choices = self.decide(self.features(step, total_steps), step)
        self.apply(choices)
        self.history.append({"step": step, "lr": self.learning_rate(),
                             "choices": {k: [c.grad, c.momentum] for k, c in sorted(choices.items())}})  # fmt: skip
        return choices

    def apply(self, choices: dict[int, LayerChoice]) -> None:
        """Set each changed choice: the gradient compressor spec (now) and the momentum plan (requested from
        the optimizer's ``ControllerPolicy``: applied before its next step)."""
        for key, choice in choices.items():
            old = self.current.get(key, LayerChoice())
            if choice.grad is not None and choice.grad != old.grad and self.gradients is not None:
                self.gradients.set_compressor(key, choice.grad)
            if choice.momentum is not None and choice.momentum != old.momentum and self.optimizer is not None:
                self.optimizer.policy.request(self.params[key], {self.momentum_state: choice.momentum})
            self.current[key] = LayerChoice(choice.grad or old.grad, choice.momentum or old.momentum)

    def state_dict(self) -> dict:
        """Plain data: the norm windows, current choices and history (save it to resume exactly)."""
        return {"norms": {k: list(v) for k, v in self.norms.items()},
                "current": {k: [c.grad, c.momentum] for k, c in self.current.items()}, "history": list(self.history)}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        """Restore the controller (the optimizer's plans and the compressor's choices load with their own
        state dicts)."""
        self.norms = {int(k): deque(v, maxlen=self.window) for k, v in state["norms"].items()}
        self.current = {int(k): LayerChoice(*c) for k, c in state["current"].items()}
        self.history = list(state["history"])


class StaticController(Controller):
    """A fixed choice per layer, applied at the first decision.

    Args:
        params, gradients, optimizer, momentum_state, every, window: as ``Controller``'s.
        choices: ``{position: LayerChoice}``, or a function ``(position, param) -> LayerChoice`` (every layer).
    """

    def __init__(self, params, choices, **kwargs):
        super().__init__(params, **kwargs)
        if callable(choices):
            choices = {k: choices(k, p) for k, p in enumerate(self.params)}
        if not isinstance(choices, dict) or not all(isinstance(c, LayerChoice) for c in choices.values()):
            raise ValueError("choices must map positions to LayerChoice (or be a function returning one)")
        bad = [k for k in choices if not isinstance(k, int) or not 0 <= k < len(self.params)]
        if bad:
            raise ValueError(f"choices name positions {bad} outside the {len(self.params)} parameters")
        self.choices = dict(choices)

    def decide(self, features, step):
        return dict(self.choices)


class AccordionController(Controller):
    """Accordion's critical-regime rule per layer (see the module doc).

    Args:
        params, gradients, optimizer, momentum_state, every, window: as ``Controller``'s.
        low: the choice outside critical regimes (default ``LayerChoice("q2", "4bit")``: hard compression).
        high: the choice in critical regimes (default ``LayerChoice("q8", "8bit")``).
        threshold: relative change of the windowed gradient norm that marks a critical regime (default 0.5,
            Accordion's eta).
        warmup_steps: steps from the start that are critical (default 0).
        lr_drop: a relative fall of the learning rate since the previous decision that marks a critical
            regime (default 0.5: the lr halved or more, as a step schedule does; None: never).
    """

    def __init__(self, params, low: LayerChoice | None = None, high: LayerChoice | None = None, threshold: float = 0.5,
                 warmup_steps: int = 0, lr_drop: float | None = 0.5, **kwargs):  # fmt: skip
        super().__init__(params, **kwargs)
        self.low = low if low is not None else LayerChoice("q2", "4bit")
        self.high = high if high is not None else LayerChoice("q8", "8bit")
        if not isinstance(self.low, LayerChoice) or not isinstance(self.high, LayerChoice):
            raise ValueError("low and high must be LayerChoice instances")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold <= 0:
            raise ValueError(f"threshold must be a number > 0, got {threshold!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        if lr_drop is not None and (isinstance(lr_drop, bool) or not isinstance(lr_drop, (int, float)) or not 0 < lr_drop < 1):
            raise ValueError(f"lr_drop must be None or a number in (0, 1), got {lr_drop!r}")
        self.threshold, self.warmup_steps, self.lr_drop = float(threshold), warmup_steps, lr_drop
        self.previous_norms: dict[int, float] = {}
        self.previous_lr: float | None = None

    def critical(self, key: int, norm: float, step: int, lr: float | None) -> bool:
        """Whether layer ``key`` is in a critical regime at ``step`` (see the class doc)."""
        if step < self.warmup_steps or math.isnan(norm):
            return True
        if self.lr_drop is not None and lr is not None and self.previous_lr and lr <= (1 - self.lr_drop) * self.previous_lr:
            return True
        before = self.previous_norms.get(key)
        return before is None or before == 0 or abs(norm - before) / before >= self.threshold

    def decide(self, features, step):
        lr = next(iter(features.values()))["lr"] if features else None
        out = {k: self.high if self.critical(k, f["norm"], step, lr) else self.low for k, f in features.items()}
        self.previous_norms = {k: f["norm"] for k, f in features.items() if not math.isnan(f["norm"])}
        self.previous_lr = lr
        return out

    def state_dict(self) -> dict:
        return {**super().state_dict(), "previous_norms": dict(self.previous_norms), "previous_lr": self.previous_lr}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.previous_norms = {int(k): float(v) for k, v in state["previous_norms"].items()}
        self.previous_lr = state["previous_lr"]
