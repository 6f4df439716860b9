"""Every controller kind behind one constructor: ``make_controller(kind, params, **kwargs)``.

| kind | class | decides from |
|---|---|---|
| ``"static"`` | ``StaticController`` | a fixed ``choices=`` (a dict, a function of the layer, or one ``LayerChoice``) |
| ``"rules"`` (alias ``"accordion"``) | ``AccordionController`` | Accordion's critical-regime rule |
| ``"planner"`` | ``PlannerController`` | measured errors of every menu option, knapsack under ``budget=`` |
| ``"learned"`` | ``learned.LearnedController`` | a policy network over the features (imported when asked for) |

Every kind takes ``Controller``'s arguments (``gradients``, ``optimizer``, ``momentum_state``, ``every``,
``window``, ``budget``) and its own; with a ``budget`` every kind's decisions are projected onto it.
"""

from __future__ import annotations

import importlib

from .controller import AccordionController, Controller, StaticController
from .planner import PlannerController

CONTROLLER_KINDS = ("static", "rules", "planner", "learned")
ALIASES = {"accordion": "rules"}


def controller_class(kind: str) -> type[Controller]:
    """The class of controller ``kind`` (see the module doc); a ``ValueError`` names an unknown kind."""
    if not isinstance(kind, str) or ALIASES.get(kind, kind) not in CONTROLLER_KINDS:
        raise ValueError(f"unknown controller kind {kind!r}; choose one of {list(CONTROLLER_KINDS)}")
    kind = ALIASES.get(kind, kind)
    if kind == "learned":
        try:
            module = importlib.import_module("efficient_optim.compress.learned")
        except ImportError as err:
            raise ValueError(f"controller kind 'learned' needs efficient_optim.compress.learned, which could not "
                             f"be imported: {err}") from err  # fmt: skip
        cls = getattr(module, "LearnedController", None)
        if cls is None:
            raise ValueError("controller kind 'learned': efficient_optim.compress.learned defines no LearnedController")
        return cls
    return {"static": StaticController, "rules": AccordionController, "planner": PlannerController}[kind]


def make_controller(kind: str, params, **kwargs) -> Controller:
    """A controller of ``kind`` over ``params``.

    Args:
        kind: one of ``CONTROLLER_KINDS`` (or an alias of ``ALIASES``).
        params: the parameters (a list, or a module), keyed by position.
        **kwargs: the class's arguments (``StaticController`` needs ``choices=``, ``PlannerController``
            ``budget=``; every kind takes ``Controller``'s).
    """
    return controller_class(kind)(params, **kwargs)
