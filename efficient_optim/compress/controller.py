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
        controller.step(step, total_steps=steps, loss=loss.item())

Kinds (one interface, ``decide(features, step)``):

- ``StaticController``: a fixed choice per layer (a dict, or a function of the layer).
- ``AccordionController``: Accordion's rule (Agarwal et al., MLSys 2021). A layer is in a *critical regime*
  when the mean norm of its gradient over the last window changed by at least ``threshold`` (relative) since
  the previous decision, during the first ``warmup_steps``, and right after the learning rate fell by at least
  ``lr_drop`` (relative); critical layers get the ``high`` choice (light compression), the others ``low``.

Features each decision sees (``features()``, ``features.py``): ``norm`` (mean ||g|| over the window),
``norm_std``, ``cos_mg`` (cosine of the momentum, decoded from the optimizer's state, and the gradient),
``curvature`` ((L_t - L_{t-1}) / ||theta_t - theta_{t-1}||^2 between decisions, from the ``loss`` given to
``step``), ``displacement``, ``progress`` (step / total steps), ``depth`` (position / (layers - 1)),
``numel``, ``ndim``, ``lr``. With ``budget=`` (a ``TrainingBudget``) every decision of every kind is
projected onto the budget before it is applied (``apply``): the training memory never exceeds it. Every
decision is kept in ``history`` (step, learning rate, training bytes, per-layer choices) so the phases can
be drawn against the schedule. Other kinds: ``planner.PlannerController`` and the learned policy
(``kinds.make_controller``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from ..policy import Policy
from .budget import TrainingBudget, accountable
from .choice import LayerChoice
from .features import FeatureTracker, decoded_momentum
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
        budget: a ``TrainingBudget``: every decision is projected onto it before it is applied, so the
            training memory never exceeds it (default None: no limit). A budget the cheapest choices cannot
            meet is a ``ValueError`` here.
    """

    def __init__(self, params, gradients=None, optimizer=None, momentum_state: str | None = None, every: int = 100,
                 window: int = 10, budget: TrainingBudget | None = None):  # fmt: skip
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
        if budget is not None and not isinstance(budget, TrainingBudget):
            raise ValueError(f"budget must be a TrainingBudget (efficient_optim.compress.TrainingBudget), got {budget!r}")
        self.gradients: GradientCompressor | None = as_gradient_compressor(gradients) if gradients is not None else None
        if momentum_state is None:
            prefixes = getattr(optimizer, "STATE_PREFIX", {})
            momentum_state = next((k for k, v in prefixes.items() if v == "m"), "exp_avg")
        self.optimizer, self.momentum_state = optimizer, momentum_state
        self.every, self.window, self.budget = every, window, budget
        self.tracker = FeatureTracker(self.params, window)
        self.current: dict[int, LayerChoice] = {}
        self.history: list[dict] = []
        self.next_step = 0  # the step of the next step() call (measurements are taken before a decision)
        if budget is not None:
            budget.check(self)

    @property
    def norms(self) -> dict:
        """Per layer, the window of gradient norms (``tracker.norms``)."""
        return self.tracker.norms

    def deciding_next(self) -> bool:
        """Whether the next ``step()`` call decides (observations before it are measured for the features)."""
        return self.next_step % self.every == 0

    def observe(self, key: int, grad: torch.Tensor) -> None:
        """Record layer ``key``'s gradient (call once per step per layer, before ``step``): its norm, and
        before a decision the measurements of ``measure``."""
        self.tracker.observe(key, grad)
        if self.deciding_next():
            self.measure(key, grad.detach())

    def measure(self, key: int, grad: torch.Tensor) -> None:
        """Measurements taken on the last gradient before a decision: cos(momentum, gradient). Subclasses
        extend it (the planner measures compression errors)."""
        m = None if self.optimizer is None else decoded_momentum(self.optimizer, self.params[key], self.momentum_state)
        self.tracker.measure_cosine(key, grad, m)

    def learning_rate(self) -> float | None:
        return None if self.optimizer is None else float(self.optimizer.param_groups[0]["lr"])

    def features(self, step: int, total_steps: int | None = None, loss: float | None = None) -> dict[int, dict]:
        """Per-layer features at ``step`` (see ``features.py``); ``loss`` is this step's loss (curvature)."""
        return self.tracker.features(step, total_steps, self.learning_rate(), loss)

    def sensitivity(self) -> dict[int, float]:
        """Per layer, its share of the squared gradient norm (the budget lowers the smallest shares first)."""
        return self.tracker.sensitivity()

    def nbytes(self) -> int:
        """Bytes the controller keeps per layer between decisions (the curvature feature's samples)."""
        return self.tracker.nbytes()

    @abstractmethod
    def decide(self, features: dict[int, dict], step: int) -> dict[int, LayerChoice]:
        """The choice per layer (layers left out keep theirs)."""

    def step(self, step: int, total_steps: int | None = None, loss: float | None = None) -> dict[int, LayerChoice] | None:
        """Decide and apply at every ``every``-th step (call after the optimizer step); the applied choices
        (projected onto the budget) or None.

        Args:
            step: the step just taken (0-based).
            total_steps: the run's length (default None: ``progress`` is None).
            loss: this step's training loss (a float or a one-element tensor; default None: no curvature).
        """
        if loss is not None:
            if isinstance(loss, torch.Tensor) and loss.numel() == 1:
                loss = float(loss.detach())
            if isinstance(loss, bool) or not isinstance(loss, (int, float)):
                raise ValueError(f"loss must be a number (this step's training loss) or None, got {loss!r}")
        self.next_step = step + 1
        if step % self.every:
            return None
        features = self.features(step, total_steps, loss)
        choices = self.apply(self.decide(features, step))
        self.tracker.mark(loss)
        sized = self.budget is not None or accountable(self.gradients)  # a custom compressor's state: unknown
        record = {"step": step, "lr": self.learning_rate(), "training_bytes": self.training_bytes() if sized else None,
                  "choices": {k: [c.grad, c.momentum] for k, c in sorted(choices.items())}}  # fmt: skip
        self.history.append(record)
        return choices

    def training_bytes(self, choices: dict | None = None) -> int:
        """Exact training memory M under ``choices`` (default: the current ones); see ``TrainingBudget``."""
        return (self.budget or _UNLIMITED).training_bytes(choices or {}, self)

    def apply(self, choices: dict[int, LayerChoice]) -> dict[int, LayerChoice]:
        """Project ``choices`` onto the budget, then set each changed one: the gradient compressor spec (now)
        and the momentum plan (requested from the optimizer's ``ControllerPolicy``: applied before its next
        step). Returns the projected choices."""
        if self.budget is not None:
            choices = self.budget.project(choices, self)
        for key, choice in choices.items():
            old = self.current.get(key, LayerChoice())
            if choice.grad is not None and choice.grad != old.grad and self.gradients is not None:
                self.gradients.set_compressor(key, choice.grad)
            if choice.momentum is not None and choice.momentum != old.momentum and self.optimizer is not None:
                self.optimizer.policy.request(self.params[key], {self.momentum_state: choice.momentum})
            self.current[key] = LayerChoice(choice.grad or old.grad, choice.momentum or old.momentum)
        return choices

    def state_dict(self) -> dict:
        """Plain data: the feature tracker (norm windows, samples, last loss), current choices and history
        (save it to resume exactly)."""
        return {**self.tracker.state_dict(), "next_step": self.next_step,
                "current": {k: [c.grad, c.momentum] for k, c in self.current.items()}, "history": list(self.history)}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        """Restore the controller (the optimizer's plans and the compressor's choices load with their own
        state dicts)."""
        self.tracker.load_state_dict(state)
        self.next_step = int(state.get("next_step", 0))
        self.current = {int(k): LayerChoice(*c) for k, c in state["current"].items()}
        self.history = list(state["history"])


_UNLIMITED = TrainingBudget(bytes=1)  # only its byte accounting is used (training_bytes without a budget)


class StaticController(Controller):
    """A fixed choice per layer, applied at the first decision.

    Args:
        params, gradients, optimizer, momentum_state, every, window: as ``Controller``'s.
        choices: ``{position: LayerChoice}``, a function ``(position, param) -> LayerChoice`` (every layer), or
            one ``LayerChoice`` for every layer.
    """

    def __init__(self, params, choices, **kwargs):
        super().__init__(params, **kwargs)
        if isinstance(choices, LayerChoice):
            choices = dict.fromkeys(range(len(self.params)), choices)
        elif callable(choices):
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
