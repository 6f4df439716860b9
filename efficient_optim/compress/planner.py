"""``PlannerController``: the adaptive-precision budget planner applied to gradients and momentum.

Adaptive precision (``policy.Budget``, docs/adaptive_precision.md) chooses each optimizer state's codec by
measuring every candidate's error on the state's real values and solving a multiple-choice knapsack (least
total error within the bytes, ``policy.allocators.knapsack_allocation``). The planner does the same for what
MANGO controls, at every decision:

- on the last gradient observed before the decision (``measure``), for every gradient spec of the menu
  (``menu.GRAD_SPECS``: 2-32 bits, 1 %, 10 % or all entries kept), the relative error of
  compress-then-decompress, ||C(g) - g|| / ||g||, on the first ``sample_elements`` elements (default 32768;
  the compressors' block structure is kept by taking a contiguous slice);
- for every momentum spec of the menu (``menu.MOMENTUM_SPECS``), the relative error of storing the momentum
  with the optimizer's own codec for that spec (``optimizer.resolve_spec``: the group's maps, block size,
  rounding, the small-tensor rule), on the same kind of sample of the momentum decoded from the optimizer
  (before the momentum exists, the gradient stands in for it: the first momentum is a multiple of it);
- each layer's errors are weighted by its share of the squared norm (of the gradient for gradient specs, of
  the momentum for momentum specs), so an item's error is its contribution to the relative squared error of
  the whole gradient (momentum): ``share x relative_error^2``; the momentum's is multiplied by
  ``momentum_weight`` (default 1.0);
- one knapsack item per layer and per controlled part (gradient, momentum), each candidate sized exactly
  (``budget.grad_bytes`` / ``budget.momentum_bytes``), solved within the budget less its fixed part. The
  solution fits by construction; ``Controller.apply`` projects it anyway (a no-op). ``gap`` is the allocator's
  bound on how much lower the optimal total error could be.

What the planner observes matters: ``GradAccumulator`` hands its observer the gradient decoded from the
layer's compressed buffer, C(x), on which the current spec (and any coarser one on the same grid) would
measure no error at all. With ``observes_compressed=True`` (default) and an ``ErrorFeedback``, the planner
measures on C(x) + e instead, where e is the residual the compression just left: x itself, to within the
residual's own rounding (8 bits by default). A raw gradient g observed before an ``ErrorFeedback`` compresses
it (a loop that round-trips ``p.grad`` in place) becomes g + e, which is exactly what that compressor is about
to receive, so the default is right there too. Without error feedback x is lost and the errors of the current
spec are understated; ``observes_compressed=False`` measures the observed gradient as it is.

A layer with no gradient observed before a decision has no measurement: all its candidates count as error
0, so it gets its cheapest option. Error feedback returns what a compressor loses at later steps; the planner
measures the single-step loss, so it is conservative about aggressive specs.
"""

from __future__ import annotations

import torch

from ..policy.allocators import Item, knapsack_allocation
from .budget import TrainingBudget, fixed_bytes, grad_bytes, grad_controlled, group_of, momentum_bytes
from .choice import LayerChoice
from .controller import Controller
from .features import decoded_momentum
from .feedback import ErrorFeedback
from .menu import GRAD_SPECS, MOMENTUM_SPECS
from .specs import parse_compressor

SAMPLE_ELEMENTS = 1 << 15
# Candidates listed most precise first: the knapsack breaks ties of equal bytes and error by list order, so a
# small tensor (whose momentum stays fp32 under every spec) is reported as the fp32 it really is.
GRADS_PRECISE_FIRST = tuple(reversed(GRAD_SPECS))
MOMENTUM_PRECISE_FIRST = tuple(reversed(MOMENTUM_SPECS))


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """||approx - exact|| / ||exact|| (0 for a zero ``exact``)."""
    norm = float(exact.norm())
    return float((approx.reshape(-1) - exact.reshape(-1)).norm()) / norm if norm > 0 else 0.0


class PlannerController(Controller):
    """The budget planner over the menu (see the module doc).

    Args:
        params, gradients, optimizer, momentum_state, every, window: as ``Controller``'s.
        budget: the ``TrainingBudget`` the knapsack fills (required).
        momentum_weight: weight of the momentum's error against the gradient's (default 1.0; >= 0).
        sample_elements: elements of each gradient and momentum the errors are measured on (default 32768).
        observes_compressed: the observed gradients are decoded from this controller's compressor (as
            ``GradAccumulator`` delivers them): the error-feedback residual is added back before measuring
            (default True; see the module doc).
    """

    def __init__(self, params, budget: TrainingBudget, momentum_weight: float = 1.0,
                 sample_elements: int = SAMPLE_ELEMENTS, observes_compressed: bool = True, **kwargs):  # fmt: skip
        if not isinstance(budget, TrainingBudget):
            raise ValueError(f"PlannerController needs budget= (a TrainingBudget), got {budget!r}")
        if isinstance(momentum_weight, bool) or not isinstance(momentum_weight, (int, float)) or momentum_weight < 0:
            raise ValueError(f"momentum_weight must be a number >= 0, got {momentum_weight!r}")
        if isinstance(sample_elements, bool) or not isinstance(sample_elements, int) or sample_elements < 1:
            raise ValueError(f"sample_elements must be an integer >= 1, got {sample_elements!r}")
        super().__init__(params, budget=budget, **kwargs)
        self.momentum_weight, self.sample_elements = float(momentum_weight), sample_elements
        self.observes_compressed = bool(observes_compressed)
        self.errors: dict[int, dict] = {}  # layer -> measurements of the coming decision
        self.gap = 0.0

    def _sample(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().reshape(-1)[: self.sample_elements].float().contiguous()

    def uncompressed(self, key: int, grad: torch.Tensor) -> torch.Tensor:
        """The gradient before compression: ``grad`` plus the residual its compression left, when the
        gradients observed are compressed ones kept with error feedback (module doc); else ``grad``."""
        if not self.observes_compressed or not isinstance(self.gradients, ErrorFeedback):
            return grad
        residual = self.gradients.residual(key)
        if residual is None or residual.numel() != grad.numel():
            return grad
        return grad.float() + residual.view(grad.shape)

    @torch.no_grad()
    def measure(self, key: int, grad: torch.Tensor) -> None:
        """cos(m, g) (``Controller.measure``) and every menu option's relative error on this gradient and on
        the layer's momentum (module doc)."""
        super().measure(key, grad)
        g = self._sample(self.uncompressed(key, grad))
        record = {"grad_sq": float(grad.float().square().sum()), "grad": {}, "momentum": {}, "momentum_sq": 0.0}
        if grad_controlled(self):
            record["grad"] = {s: relative_error(parse_compressor(s).roundtrip(g), g) for s in GRAD_SPECS}
        if self.optimizer is not None:
            p, name = self.params[key], self.momentum_state
            m = decoded_momentum(self.optimizer, p, name)
            m = grad.detach().float() if m is None else m
            record["momentum_sq"] = float(m.square().sum())
            group = group_of(self.optimizer, p)
            if name in self.optimizer.default_specs(p, group):
                sample = self._sample(m)
                for spec in MOMENTUM_SPECS:
                    codec = self.optimizer.resolve_spec(name, spec, p, group)
                    tmp: dict = {}
                    codec.init(tmp, name, sample)
                    codec.encode(tmp, name, sample.clone())
                    record["momentum"][spec] = relative_error(codec.decode(tmp, name, sample), sample)
        self.errors[key] = record

    def _items(self) -> list[Item]:
        grad_total = sum(r["grad_sq"] for r in self.errors.values()) or 1.0
        momentum_total = sum(r["momentum_sq"] for r in self.errors.values()) or 1.0
        items = []
        for key in range(len(self.params)):
            record = self.errors.get(key, {})
            if grad_controlled(self):
                share = record.get("grad_sq", 0.0) / grad_total
                errs = record.get("grad", {})
                items.append(Item((key, "grad"), list(GRADS_PRECISE_FIRST),
                                  [grad_bytes(self, key, s) for s in GRADS_PRECISE_FIRST],
                                  [share * errs.get(s, 0.0) ** 2 for s in GRADS_PRECISE_FIRST]))  # fmt: skip
            if self.optimizer is not None:
                share = self.momentum_weight * record.get("momentum_sq", 0.0) / momentum_total
                errs = record.get("momentum", {})
                items.append(Item((key, "momentum"), list(MOMENTUM_PRECISE_FIRST),
                                  [momentum_bytes(self, key, s) for s in MOMENTUM_PRECISE_FIRST],
                                  [share * errs.get(s, 0.0) ** 2 for s in MOMENTUM_PRECISE_FIRST]))  # fmt: skip
        return items

    def decide(self, features, step):
        """The least-error choices within the budget (module doc)."""
        items = self._items()
        available = self.budget.limit(self) - sum(fixed_bytes(self).values())
        if not grad_controlled(self):  # gradients this controller cannot change still take their bytes
            available -= sum(grad_bytes(self, k) for k in range(len(self.params)))
        chosen, self.gap = knapsack_allocation(items, available)
        self.errors = {}
        by_key = {it.key: it for it in items}
        out = {}
        for key in range(len(self.params)):
            g, m = by_key.get((key, "grad")), by_key.get((key, "momentum"))
            out[key] = LayerChoice(g.specs[chosen[g.key]] if g else None, m.specs[chosen[m.key]] if m else None)
        return out

    def state_dict(self) -> dict:
        return {**super().state_dict(), "errors": {k: dict(v) for k, v in self.errors.items()}, "gap": self.gap}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.errors = {int(k): dict(v) for k, v in state.get("errors", {}).items()}
        self.gap = float(state.get("gap", 0.0))
