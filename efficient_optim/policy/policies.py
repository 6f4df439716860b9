"""Policies: which codec each state of each parameter gets, decided once per parameter and re-decided on demand.

An optimizer of the library asks its policy for a *plan* when a parameter's state is created: state name ->
spec (``"fp32" | "bf16" | "8bit" | "4bit" | "factored" | "lowrank"``, a ``StateCodec`` instance, or a
recorded codec), from what it knows of the parameter (``ParamInfo``: name, global shape, dtype, its param
group) and what the optimizer's own settings would give (``defaults``). The optimizer turns specs into codecs
(``policy.specs.resolve_codec``, with the small-tensor rule) and keeps the plan. A *dynamic* policy may change
plans between steps (``replan``); the optimizer then transcodes each changed state once.

- ``Policy``: the base, and the static policy: the optimizer's settings decide (today's behaviour).
- ``ByName``: per-parameter overrides by regular expression on the parameter's name.
- ``ByIndex``: per-parameter overrides by position (for plain ``parameters()``).
- ``Schedule``: a policy per step range (e.g. 8-bit for the first 1000 steps, then 4-bit).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .specs import check_spec

STATE_ALIASES = {"m": "exp_avg", "v": "exp_avg_sq"}  # short names users may write for Adam's moments


@dataclass(frozen=True)
class ParamInfo:
    """What a policy knows of one parameter.

    Attributes:
        name: its name from ``named_parameters()`` (None when the optimizer got plain parameters).
        index: its position among the optimizer's parameters (the index of ``state_dict()``).
        shape: its global shape (a DTensor shard reports the whole parameter's shape).
        dtype: its dtype.
        group: its param group (settings), read-only by convention.
    """

    name: str | None
    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    group: dict = field(compare=False, repr=False)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def _normalize(choice, states: Mapping) -> dict:
    """A user's choice (one spec for every state, or a dict by state name or alias) -> {state name: spec}."""
    if isinstance(choice, Mapping) and "codec" not in choice:
        out = {}
        for key, spec in choice.items():
            name = STATE_ALIASES.get(key, key)
            if name in states:
                out[name] = spec
        return out
    return dict.fromkeys(states, choice)


class Policy:
    """The static policy (and the base of every policy): each state gets the spec the optimizer's settings give.

    Subclasses override ``choose`` (static choices) and, for policies that change plans during training, set
    ``dynamic = True`` and implement ``replan``; ``state_dict`` / ``load_state_dict`` carry their own state
    through optimizer checkpoints.
    """

    dynamic = False
    needs_names = False

    def choose(self, info: ParamInfo, defaults: dict) -> dict:
        """State name -> spec for the parameter ``info``; ``defaults`` are the optimizer settings' specs."""
        return dict(defaults)

    def bind(self, optimizer) -> None:
        """Called once by the optimizer when it is built (its param groups exist): a policy that plans the whole
        model at once (``Budget``) sizes it here."""

    def observe(self, optimizer, index: int, param: torch.Tensor, group: dict, values: dict, grad=None) -> None:
        """Receives one step's exact state values (before encoding) and the gradient (``grad``, when the rule
        has it) of a parameter the policy asked to watch (``optimizer.request_error_stats``)."""

    def replan(self, optimizer) -> list[tuple[torch.Tensor, dict]]:
        """Changes to apply before the next step: ``[(param, {state name: spec}), ...]`` (dynamic policies)."""
        return []

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ByName(Policy):
    """Per-parameter specs by regular expression on the parameter's name (from ``named_parameters()``).

    Args:
        rules: ``{pattern: choice}``; the first pattern that ``re.search``-matches the name decides. A choice is
            a spec for every state (``"fp32"``, ``"8bit"``, ``"4bit"``, ``"bf16"``, ``"factored"``,
            ``"lowrank"``, a ``StateCodec``) or a dict per state (``{"m": "8bit", "v": "factored"}``; ``m``/``v``
            stand for ``exp_avg``/``exp_avg_sq``; states not named keep the default).
        default: the choice for names no pattern matches; None (default) keeps the optimizer's settings.

    Example: ``QAdamW(model.named_parameters(), policy=ByName({"wte|wpe": "fp32", r"h\\.0\\.": "8bit"},
    default="4bit"))``. Specs still follow the small-tensor rule (tiny tensors keep full precision).
    """

    needs_names = True

    def __init__(self, rules: Mapping[str, object], default=None):
        if not isinstance(rules, Mapping):
            raise ValueError(f"ByName: rules must be a dict {{pattern: spec}}, got {type(rules).__name__}")
        self.rules = []
        for pattern, choice in rules.items():
            try:
                compiled = re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"ByName: invalid pattern {pattern!r}: {exc}") from None
            _check_choice(choice, f"ByName spec of {pattern!r}")
            self.rules.append((compiled, choice))
        if default is not None:
            _check_choice(default, "ByName default")
        self.default = default

    def choose(self, info, defaults):
        out = dict(defaults)
        for pattern, choice in self.rules:
            if info.name is not None and pattern.search(info.name):
                out.update(_normalize(choice, defaults))
                return out
        if self.default is not None:
            out.update(_normalize(self.default, defaults))
        return out

    def __repr__(self) -> str:
        rules = {p.pattern: c for p, c in self.rules}
        return f"ByName({rules!r}, default={self.default!r})"


class ByIndex(Policy):
    """Per-parameter specs by position among the optimizer's parameters (for plain ``parameters()``).

    Args:
        rules: ``{index: choice}`` (a choice as ``ByName`` takes it); indices count every parameter of every
            param group in order, as ``state_dict()`` does.
        default: the choice for the other parameters; None (default) keeps the optimizer's settings.
    """

    def __init__(self, rules: Mapping[int, object], default=None):
        if not isinstance(rules, Mapping):
            raise ValueError(f"ByIndex: rules must be a dict {{index: spec}}, got {type(rules).__name__}")
        for index, choice in rules.items():
            if isinstance(index, bool) or not isinstance(index, int) or index < 0:
                raise ValueError(f"ByIndex: invalid parameter index {index!r} (an integer >= 0)")
            _check_choice(choice, f"ByIndex spec of parameter #{index}")
        if default is not None:
            _check_choice(default, "ByIndex default")
        self.rules, self.default = dict(rules), default

    def choose(self, info, defaults):
        out = dict(defaults)
        choice = self.rules.get(info.index, self.default)
        if choice is not None:
            out.update(_normalize(choice, defaults))
        return out

    def __repr__(self) -> str:
        return f"ByIndex({self.rules!r}, default={self.default!r})"


class Schedule(Policy):
    """A policy per range of optimizer steps: ``Schedule({0: "8bit", 1000: "4bit"})`` stores states in 8 bits for
    the first 1000 steps, then transcodes them to 4 bits (once) and continues.

    Args:
        phases: ``{first step: policy or choice}``; must contain 0. A choice is what ``ByName`` takes (a spec or
            a dict per state); a ``Policy`` is asked per parameter.

    The step count is the number of ``step()`` calls the optimizer has made (saved in its checkpoints).
    """

    dynamic = True

    def __init__(self, phases: Mapping[int, object]):
        if not isinstance(phases, Mapping) or 0 not in phases:
            raise ValueError("Schedule: phases must be a dict {first step: policy or spec} containing step 0")
        self.phases = []
        for start, choice in sorted(phases.items()):
            if isinstance(start, bool) or not isinstance(start, int) or start < 0:
                raise ValueError(f"Schedule: invalid first step {start!r} (an integer >= 0)")
            if not isinstance(choice, Policy):
                _check_choice(choice, f"Schedule spec of step {start}")
                choice = ByName({}, default=choice)
            self.phases.append((start, choice))
        self.steps = 0
        self._phase = 0

    def _current(self) -> int:
        return max(i for i, (start, _) in enumerate(self.phases) if start <= self.steps)

    def choose(self, info, defaults):
        return self.phases[self._phase][1].choose(info, defaults)

    def replan(self, optimizer):
        """Counts the step about to be taken; at a phase boundary every planned parameter is re-planned."""
        phase = self._current()
        self.steps += 1
        if phase == self._phase:
            return []
        self._phase = phase
        return [(p, optimizer.policy_choice(p)) for p in optimizer.planned_params()]

    def state_dict(self):
        return {"steps": self.steps, "phase": self._phase}

    def load_state_dict(self, state):
        self.steps, self._phase = int(state["steps"]), int(state["phase"])


def _check_choice(choice, what: str) -> None:
    if isinstance(choice, Mapping) and "codec" not in choice:
        for key, spec in choice.items():
            check_spec(spec, f"{what}[{key!r}]")
    else:
        check_spec(choice, what)
