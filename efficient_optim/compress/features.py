"""What a controller knows about each layer when it decides: ``FeatureTracker``.

Per layer, at each decision (``features``):

- ``norm``, ``norm_std``: mean and standard deviation of ||g|| over the last ``window`` observed gradients
  (NaN before any);
- ``cos_mg``: cosine between the layer's momentum, as the optimizer holds it (decoded by its own codec:
  quantized, bf16, ...), and its gradient, measured on the last gradient observed before the decision (the
  momentum is then the previous step's); NaN without an optimizer, before the momentum exists, or when either
  is zero;
- ``curvature``: (L_t - L_{t-1}) / ||theta_t - theta_{t-1}||^2 between this decision and the previous one
  (L: the loss given to ``Controller.step``; the same value for every layer); NaN without both losses or
  without a displacement;
- ``displacement``: this layer's ||theta_t - theta_{t-1}||^2 since the previous decision (NaN at the first);
- ``progress`` (step / total steps, None without a total), ``depth`` (position / (layers - 1)), ``numel``,
  ``ndim``, ``lr``.

The displacement is measured without a copy of the parameters: at each decision the tracker keeps a strided
sample of each layer (every ``ceil(numel / 512)``-th element, float32: at most 2 KiB per layer, exact for
layers of at most 512 elements) and scales the sample's squared displacement by ``numel / samples``. It is
an estimate for larger layers (unbiased when the update is spread evenly over the strides; with 512 samples
its relative noise is a few percent for a Gaussian-like update, more for a heavy-tailed one); ``nbytes()``
reports the samples' bytes and ``TrainingBudget`` counts them. A full copy would cost 4 B per parameter.
"""

from __future__ import annotations

import math
from collections import deque

import torch

SNAPSHOT_ELEMENTS = 512  # elements of each layer's parameter sample kept between decisions


def stride_of(numel: int) -> int:
    """The stride of a layer's parameter sample (every element for layers up to ``SNAPSHOT_ELEMENTS``)."""
    return max(1, math.ceil(numel / SNAPSHOT_ELEMENTS))


def decoded_momentum(optimizer, param: torch.Tensor, name: str) -> torch.Tensor | None:
    """``param``'s state ``name`` decoded by the optimizer's codec (float32, param-shaped), or None when the
    optimizer has no such state yet."""
    state = optimizer.state.get(param)
    if not state:
        return None
    codec = optimizer.plan_of(param).get(name)
    if codec is None or not all(k in state for k in codec.keys(name, param)):
        return None
    return codec.decode(state, name, param).float()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """cos(a, b) over all elements; NaN when either is zero."""
    a, b = a.reshape(-1).float(), b.reshape(-1).float()
    na, nb = float(a.norm()), float(b.norm())
    if na == 0 or nb == 0:
        return float("nan")
    return float(torch.dot(a, b)) / (na * nb)


class FeatureTracker:
    """Keeps the per-layer observations a controller's features are made of (see the module doc).

    Args:
        params: the layers' parameters, by position.
        window: gradient norms kept per layer (>= 1).
    """

    def __init__(self, params: list, window: int):
        self.params, self.window = params, window
        self.norms = {k: deque(maxlen=window) for k in range(len(params))}
        self.cos_mg: dict[int, float] = {}
        self.snapshots: dict[int, torch.Tensor] = {}
        self.last_loss: float | None = None

    def sample(self, key: int) -> torch.Tensor:
        """Layer ``key``'s strided parameter sample now (float32)."""
        p = self.params[key].detach().reshape(-1)
        return p[:: stride_of(p.numel())].float().clone()

    def observe(self, key: int, grad: torch.Tensor) -> None:
        """Record ``grad``'s norm for layer ``key``."""
        self.norms[key].append(float(grad.detach().float().norm()))

    def measure_cosine(self, key: int, grad: torch.Tensor, momentum: torch.Tensor | None) -> None:
        """Record cos(momentum, grad) of layer ``key`` for the next decision (NaN without a momentum)."""
        self.cos_mg[key] = float("nan") if momentum is None else cosine(momentum, grad)

    def displacement(self, key: int) -> float:
        """Estimated ||theta_now - theta_at_last_decision||^2 of layer ``key`` (NaN before a decision)."""
        before = self.snapshots.get(key)
        if before is None:
            return float("nan")
        now = self.sample(key)
        return float((now - before).square().sum()) * (self.params[key].numel() / max(1, now.numel()))

    def features(self, step: int, total_steps: int | None, lr: float | None, loss: float | None) -> dict:
        """Per-layer features at ``step`` (module doc)."""
        n = len(self.params)
        moved = {k: self.displacement(k) for k in range(n)}
        total = sum(moved.values())
        if loss is None or self.last_loss is None or not total > 0:  # NaN or 0: no curvature
            curvature = float("nan")
        else:
            curvature = (float(loss) - self.last_loss) / total
        out = {}
        for key, p in enumerate(self.params):
            norms = list(self.norms[key])
            mean = sum(norms) / len(norms) if norms else float("nan")
            std = math.sqrt(sum((x - mean) ** 2 for x in norms) / len(norms)) if norms else float("nan")
            out[key] = {"norm": mean, "norm_std": std, "cos_mg": self.cos_mg.get(key, float("nan")),
                        "curvature": curvature, "displacement": moved[key],
                        "progress": step / total_steps if total_steps else None, "depth": key / max(1, n - 1),
                        "numel": p.numel(), "ndim": p.ndim, "lr": lr}  # fmt: skip
        return out

    def mark(self, loss: float | None) -> None:
        """After a decision: keep the loss and the parameter samples the next decision compares with."""
        self.last_loss = None if loss is None else float(loss)
        self.snapshots = {k: self.sample(k) for k in range(len(self.params))}
        self.cos_mg = {}

    def sensitivity(self) -> dict[int, float]:
        """Each layer's share of the squared gradient norm (windowed means; a layer not observed yet gets 1/n,
        and every layer 1/n before any observation)."""
        n = len(self.params)
        sq = {k: (sum(v) / len(v)) ** 2 for k, v in self.norms.items() if v}
        total = sum(sq.values())
        if not sq or total <= 0:
            return dict.fromkeys(range(n), 1.0 / n)
        fill = 1.0 / n
        return {k: sq[k] / total if k in sq else fill for k in range(n)}

    def nbytes(self) -> int:
        """Bytes of the parameter samples kept between decisions (what the curvature feature costs)."""
        return sum(4 * math.ceil(p.numel() / stride_of(p.numel())) for p in self.params)

    def state_dict(self) -> dict:
        return {"norms": {k: list(v) for k, v in self.norms.items()}, "cos_mg": dict(self.cos_mg),
                "snapshots": dict(self.snapshots), "last_loss": self.last_loss}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.norms = {int(k): deque(v, maxlen=self.window) for k, v in state["norms"].items()}
        self.cos_mg = {int(k): float(v) for k, v in state.get("cos_mg", {}).items()}
        self.snapshots = {int(k): t.clone() for k, t in state.get("snapshots", {}).items()}
        self.last_loss = state.get("last_loss")
