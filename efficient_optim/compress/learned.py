"""The learned compression policy: a small LSTM over the layers that picks each layer's menu choice.

At every decision the controller's per-layer features (``Controller.features``) are encoded into one vector
per layer (``encode_features``: robust scaling, NaN/None -> 0 with a missing flag), read by an LSTM over the
layers in depth order (position in the parameter list), and three categorical heads per layer give the
gradient bits (``menu.GRAD_BITS``), the kept fraction (``menu.KEEP_FRACTIONS``) and the momentum spec
(``menu.MOMENTUM_SPECS``); a value head (used by PPO) reads the mean of the LSTM's outputs.

    ctl = LearnedController(params, policy="default", gradients=ErrorFeedback(Quantize(8)), optimizer=opt)
    ... ctl.step(step, total_steps=steps) as any controller ...

``policy`` is ``"default"`` (the policy shipped in ``compress/policies/default.pt``; ``"default_bc"``: the same
run's policy after behaviour cloning alone), a path of a file saved by ``save_policy`` (``effopt mango
train-policy`` writes one) or a ``PolicyNetwork``. The base class applies
(and, with a budget, projects) the choices. A policy file is a plain ``torch.save`` of tensors and lists
(``torch.load(weights_only=True)`` reads it): a format tag, a version, the encoded feature list, the menu and
the network's configuration and weights; a file whose version, features or menu differ is refused with an
error that names the difference.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from .controller import Controller
from .menu import GRAD_BITS, KEEP_FRACTIONS, MOMENTUM_SPECS, choice_from_indices

POLICY_FORMAT = "efficient_optim.compress.learned_policy"
POLICY_VERSION = 1
DEFAULT_POLICY = Path(__file__).parent / "policies" / "default.pt"
MAX_HIDDEN = 64
STORED_DTYPE = torch.float16  # the weights' dtype in a policy file (a few KB)
HEAD_SIZES = (len(GRAD_BITS), len(KEEP_FRACTIONS), len(MOMENTUM_SPECS))
HEAD_NAMES = ("grad_bits", "keep_fraction", "momentum")

# The encoded per-layer features, each in roughly [-2, 2], followed by one missing flag per feature.
ENCODED_FEATURES = (
    "log_norm",  # log10 ||g|| (windowed mean) / 4
    "relative_log_norm",  # log10 ||g|| minus its median over the layers, clipped to [-3, 3] / 2
    "norm_cv",  # std / mean of ||g|| over the window, clipped to [0, 3]
    "cos_mg",  # cosine of momentum and gradient
    "curvature",  # sign(c) log10(1 + |c|) / 3, clipped to [-2, 2]
    "progress",  # step / total steps
    "depth",  # position / (layers - 1)
    "log_numel",  # log10(size) / 8
    "ndim",  # min(ndim, 4) / 4
    "log_lr",  # (log10 lr + 3) / 2, clipped to [-2, 2]
    "budget_room",  # (budget - cheapest M) / (most precise M - cheapest M), clipped to [0, 1.5] (budget_room())
)
INPUT_SIZE = 2 * len(ENCODED_FEATURES)


def _number(value) -> float | None:
    """``value`` as a finite float, or None (missing: None, NaN, inf, not a number)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _clip(x: float, low: float, high: float) -> float:
    return min(high, max(low, x))


def _log10(x: float | None) -> float | None:
    return math.log10(x) if x is not None and x > 0 else None


def encode_features(features: dict[int, dict]) -> torch.Tensor:
    """The network's input for one decision: a ``[layers, INPUT_SIZE]`` float32 tensor, layers in position order.

    Args:
        features: ``Controller.features()``: position -> {``norm``, ``norm_std``, ``cos_mg``, ``curvature``,
            ``progress``, ``depth``, ``numel``, ``ndim``, ``lr``, ``budget_room``}; absent, None or non-finite
            values count as missing (value 0, flag 1), so a controller without some feature still works.
    """
    if not features:
        raise ValueError("encode_features needs the features of at least one layer")
    keys = sorted(features)
    log_norms = [_log10(_number(features[k].get("norm"))) for k in keys]
    known = sorted(x for x in log_norms if x is not None)
    median = known[len(known) // 2] if known else None
    rows = []
    for key, log_norm in zip(keys, log_norms):
        f = features[key]
        norm, std = _number(f.get("norm")), _number(f.get("norm_std"))
        curvature, lr = _number(f.get("curvature")), _number(f.get("lr"))
        numel, ndim = _number(f.get("numel")), _number(f.get("ndim"))
        cos = _number(f.get("cos_mg"))
        values = [
            None if log_norm is None else _clip(log_norm, -12, 4) / 4,
            None if log_norm is None else _clip(log_norm - median, -3, 3) / 2,
            None if norm is None or std is None or norm <= 0 else _clip(std / norm, 0, 3),
            None if cos is None else _clip(cos, -1, 1),
            None if curvature is None else _clip(math.copysign(math.log10(1 + abs(curvature)), curvature) / 3, -2, 2),
            None if _number(f.get("progress")) is None else _clip(_number(f.get("progress")), 0, 1),
            None if _number(f.get("depth")) is None else _clip(_number(f.get("depth")), 0, 1),
            None if numel is None or numel < 1 else math.log10(numel) / 8,
            None if ndim is None else min(ndim, 4) / 4,
            None if _log10(lr) is None else _clip((_log10(lr) + 3) / 2, -2, 2),
            None if _number(f.get("budget_room")) is None else _clip(_number(f.get("budget_room")), 0, 1.5),
        ]
        rows.append([0.0 if v is None else v for v in values] + [float(v is None) for v in values])
    return torch.tensor(rows, dtype=torch.float32)


def budget_room(controller: Controller) -> float | None:
    """Where ``controller``'s budget lies between the cheapest menu choices (0) and the most precise ones (1):
    ``(limit - M_cheapest) / (M_precise - M_cheapest)``; 1.0 without a budget (no choice is constrained, as
    under a budget that fits the most precise choices). Sizes are fixed for a run, so they are computed once
    per controller."""
    budget = getattr(controller, "budget", None)
    if budget is None:
        return 1.0
    cached = getattr(controller, "_budget_sizes", None)
    if cached is None or cached[0] is not budget:
        precise = {k: choice_from_indices(len(GRAD_BITS) - 1, len(KEEP_FRACTIONS) - 1, len(MOMENTUM_SPECS) - 1)
                   for k in range(len(controller.params))}  # fmt: skip
        cached = (budget, budget.minimum_bytes(controller), budget.training_bytes(precise, controller))
        controller._budget_sizes = cached
    _, cheapest, most = cached
    return (budget.limit(controller) - cheapest) / max(1, most - cheapest)


def decision_input(controller: Controller, features: dict[int, dict]) -> torch.Tensor:
    """The network's input for ``controller``'s decision: its ``features`` with its ``budget_room``, encoded."""
    room = budget_room(controller)
    return encode_features({k: {**f, "budget_room": room} for k, f in features.items()})


class PolicyNetwork(nn.Module):
    """An LSTM over the layers with three categorical heads per layer and a value head.

    Args:
        hidden: the LSTM's hidden size (default 16; at most 64).
        input_size: the size of one layer's encoded features (default ``INPUT_SIZE``).
    """

    def __init__(self, hidden: int = 16, input_size: int = INPUT_SIZE):
        super().__init__()
        if isinstance(hidden, bool) or not isinstance(hidden, int) or not 1 <= hidden <= MAX_HIDDEN:
            raise ValueError(f"hidden must be an integer in [1, {MAX_HIDDEN}], got {hidden!r}")
        self.hidden, self.input_size = hidden, input_size
        self.embed = nn.Linear(input_size, hidden)
        self.lstm = nn.LSTM(hidden, hidden, batch_first=True)
        self.heads = nn.ModuleList(nn.Linear(hidden, n) for n in HEAD_SIZES)
        self.value = nn.Linear(hidden, 1)

    def config(self) -> dict:
        return {"hidden": self.hidden, "input_size": self.input_size}

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``x``: ``[layers, input_size]`` (one decision) -> (three ``[layers, n]`` logit tensors, a scalar value)."""
        if x.ndim != 2 or x.shape[1] != self.input_size:
            raise ValueError(f"the policy expects [layers, {self.input_size}] features, got {list(x.shape)}")
        out, _ = self.lstm(torch.tanh(self.embed(x)).unsqueeze(0))
        out = out.squeeze(0)
        return [head(out) for head in self.heads], self.value(out.mean(0)).squeeze(-1)

    def distribution(self, x: torch.Tensor) -> tuple[list[torch.distributions.Categorical], torch.Tensor]:
        logits, value = self(x)
        return [torch.distributions.Categorical(logits=z) for z in logits], value

    def evaluate(self, x: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(summed log-probability of ``actions`` ``[layers, 3]``, mean entropy per layer and head, value)."""
        dists, value = self.distribution(x)
        log_prob = sum(d.log_prob(actions[:, i]).sum() for i, d in enumerate(dists))
        entropy = sum(d.entropy().mean() for d in dists) / len(dists)
        return log_prob, entropy, value

    @torch.no_grad()
    def act(self, x: torch.Tensor, deterministic: bool = True, generator: torch.Generator | None = None):
        """Actions ``[layers, 3]`` (argmax, or sampled with ``generator``), their summed log-probability and
        the value."""
        dists, value = self.distribution(x)
        if deterministic:
            actions = torch.stack([d.probs.argmax(-1) for d in dists], dim=1)
        else:
            actions = torch.stack([torch.multinomial(d.probs, 1, generator=generator).squeeze(-1) for d in dists], dim=1)
        log_prob = sum(d.log_prob(actions[:, i]).sum() for i, d in enumerate(dists))
        return actions, log_prob, value


def _menu() -> dict:
    return {"grad_bits": list(GRAD_BITS), "keep_fractions": list(KEEP_FRACTIONS), "momentum_specs": list(MOMENTUM_SPECS)}


def policy_record(net: PolicyNetwork, metadata: dict | None = None) -> dict:
    """The plain data ``save_policy`` writes (format, version, features, menu, config, the weights as one flat
    tensor with their names and shapes, metadata)."""
    state = net.state_dict()
    return {"format": POLICY_FORMAT, "version": POLICY_VERSION, "features": list(ENCODED_FEATURES), "menu": _menu(),
            "config": net.config(), "names": list(state), "shapes": [list(v.shape) for v in state.values()],
            "weights": torch.cat([v.detach().reshape(-1) for v in state.values()]).to(STORED_DTYPE),
            "metadata": dict(metadata or {})}  # fmt: skip


def round_weights(net: PolicyNetwork) -> PolicyNetwork:
    """Round ``net``'s weights to what a policy file stores (``STORED_DTYPE``), in place; returns it."""
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(p.to(STORED_DTYPE).float())
    return net


def save_policy(net: PolicyNetwork, path, metadata: dict | None = None) -> Path:
    """Write ``net`` to ``path`` (a few KB; weights stored as float16, so a loaded policy equals
    ``round_weights(net)``; ``metadata``: plain data kept beside it, e.g. how it was trained)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(policy_record(net, metadata), path)
    return path


def policy_from_record(record, source: str = "the policy") -> PolicyNetwork:
    """The network of a ``policy_record``; ``ValueError`` naming what differs from this version's policies."""
    if not isinstance(record, dict) or record.get("format") != POLICY_FORMAT:
        raise ValueError(f"{source} is not a compression policy file (no {POLICY_FORMAT!r} format tag)")
    if record.get("version") != POLICY_VERSION:
        raise ValueError(f"{source} has policy format version {record.get('version')!r}; this library reads version "
                         f"{POLICY_VERSION} (retrain it with effopt mango train-policy)")  # fmt: skip
    if list(record.get("features", [])) != list(ENCODED_FEATURES):
        raise ValueError(f"{source} was trained on features {record.get('features')}, this library encodes "
                         f"{list(ENCODED_FEATURES)} (retrain it with effopt mango train-policy)")  # fmt: skip
    if record.get("menu") != _menu():
        raise ValueError(f"{source} was trained on the menu {record.get('menu')}, this library's menu is {_menu()} "
                         "(retrain it with effopt mango train-policy)")  # fmt: skip
    net = PolicyNetwork(**record["config"])
    try:
        sizes = [math.prod(shape) for shape in record["shapes"]]
        parts = torch.split(record["weights"].float(), sizes)
        net.load_state_dict({k: v.reshape(shape) for k, v, shape in zip(record["names"], parts, record["shapes"])})
    except (RuntimeError, KeyError, ValueError) as exc:
        raise ValueError(f"{source}: its weights do not fit its configuration {record['config']}: {exc}") from None
    net.metadata = dict(record.get("metadata", {}))
    return net


def shipped_policies() -> list[str]:
    """Names of the policies shipped in ``compress/policies`` (``"default"``: behaviour cloning + PPO;
    ``"default_bc"``: the same run's policy after behaviour cloning alone)."""
    return sorted(p.stem for p in DEFAULT_POLICY.parent.glob("*.pt"))


def load_policy(path="default") -> PolicyNetwork:
    """The policy saved at ``path``, or a shipped one by name (``shipped_policies()``: ``"default"``, ...);
    clear errors for a missing or foreign file."""
    shipped = isinstance(path, str) and path in ("default", *shipped_policies())
    path = DEFAULT_POLICY.parent / f"{path}.pt" if shipped else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no policy file at {path}" + (" (a shipped policy is missing: reinstall efficient_optim "
                                "or train one with effopt mango train-policy)" if shipped else ""))  # fmt: skip
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"{path} is not a readable policy file: {exc}") from None
    return policy_from_record(record, str(path))


class LearnedController(Controller):
    """A controller whose choices come from a ``PolicyNetwork`` (see the module doc).

    Args:
        params, gradients, optimizer, momentum_state, every, window and the base class's other keyword
            arguments (e.g. a budget): as ``Controller``'s.
        policy: ``"default"`` (the shipped policy; ``"default_bc"``: behaviour cloning only), a path of a saved
            policy, or a ``PolicyNetwork``.
        deterministic: take each head's most likely choice (default True); False samples (seeded by ``seed``).
        seed: seeds the sampling when ``deterministic`` is False (default 0).
        record: keep every decision's encoded features, actions, log-probability and value in ``trace``
            (what PPO trains on; default False).
    """

    def __init__(self, params, policy="default", deterministic: bool = True, seed: int = 0, record: bool = False,
                 **kwargs):  # fmt: skip
        super().__init__(params, **kwargs)
        if isinstance(policy, (str, Path)):
            policy = load_policy(policy)
        if not isinstance(policy, PolicyNetwork):
            raise ValueError(f"policy must be 'default', a policy file path or a PolicyNetwork, got {policy!r}")
        self.network, self.deterministic, self.record = policy, bool(deterministic), bool(record)
        self.generator = torch.Generator().manual_seed(seed)
        self.trace: list[dict] = []

    def decide(self, features, step):
        keys = sorted(features)
        x = decision_input(self, features)
        actions, log_prob, value = self.network.act(x, self.deterministic, self.generator)
        if self.record:
            self.trace.append({"step": step, "obs": x, "actions": actions, "log_prob": float(log_prob),
                               "value": float(value)})  # fmt: skip
        return {k: choice_from_indices(*(int(i) for i in a)) for k, a in zip(keys, actions.tolist())}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if "generator" in state:
            self.generator.set_state(state["generator"])
