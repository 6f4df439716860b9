"""The training environment of the learned compression policy: one episode trains a tiny language model.

An episode (``run_episode``) trains a small character-level MLP language model on a slice of Tiny Shakespeare
(the corpus the package ships in ``bench/corpora``) for ``steps`` optimizer steps of ``micro_batches``
micro-batches each. Gradients are accumulated compressed (``GradAccumulator`` with ``ErrorFeedback``); the
optimizer is ``efficient_optim.AdamW`` built with ``policy=ControllerPolicy()``; a controller (any kind, built
by the caller's factory) decides every ``every`` steps. The model's width and depth, the learning rate and its
schedule (cosine, or a step drop at two thirds), the data offset and the training-memory budget (a
``TrainingBudget``, the controller's hard limit, enforced by projection) are drawn from the episode's seed,
so a policy sees varied layers, regimes and budgets. Each episode is deterministic given its seed and runs
in one to two seconds on one core.

Reward of decision k (applied from its step until the next decision):

    r_k = -alpha * loss_k + beta * memory_saved_k - gamma * compression_error_k

- ``loss_k``: the mean training loss of the steps trained under decision k;
- ``memory_saved_k``: ``1 - training_bytes / reference``, the training bytes (``profiling.training_bytes``:
  parameters, the accumulator's compressed buffers and residuals plus the one decoded gradient, optimizer
  states) measured at the end of the interval, against fp32 AdamW with fp32 gradients (16 bytes per
  parameter: 4 parameter + 4 gradient + 8 moments);
- ``compression_error_k``: the size-weighted mean over layers of the relative L2 error of compressing the
  layer's last gradient with its chosen gradient spec and its momentum with its chosen momentum codec (half
  each), measured at the decision.

Defaults ``alpha = 1.0, beta = 1.0, gamma = 0.5`` (``RewardWeights``). The loss term is large (about 3.5 per
decision) but nearly the same for every choice over so short a run; what the choices change is mostly the
memory and error terms (a few hundredths to tenths per decision). PPO's group advantages (``ppo``) compare
episodes on the same seed, so the loss level cancels and only its differences count.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .accumulate import GradAccumulator
from .budget import TrainingBudget
from .controller import Controller, ControllerPolicy
from .feedback import ErrorFeedback
from .quantize import Quantize
from .specs import parse_compressor

CORPUS = Path(__file__).resolve().parent.parent / "bench" / "corpora" / "tinyshakespeare.txt"
REFERENCE_BYTES_PER_PARAM = 16  # fp32 AdamW, fp32 gradients: 4 parameter + 4 gradient + 8 moments


@dataclass(frozen=True)
class RewardWeights:
    """``r = -alpha * loss + beta * memory_saved - gamma * compression_error`` (module doc)."""

    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 0.5


@dataclass(frozen=True)
class EpisodeConfig:
    """One episode's settings.

    Args:
        steps: optimizer steps (default 48).
        every: the controller decides every this many steps (default 8: 6 decisions).
        micro_batches: micro-batches accumulated per step (default 2).
        batch: sequences per micro-batch (default 16).
        context: characters the model reads to predict the next one (default 16).
        widths: hidden widths an episode draws from (default (48, 96, 160)).
        depths: numbers of hidden layers an episode draws from (default (1, 2, 3)).
        lrs: peak learning rates an episode draws from (default (1e-3, 3e-3)).
        text_chars: characters of the corpus used (default 200_000).
        budgets: training-memory budgets (``TrainingBudget(bytes_per_param=)``, the controller's M: parameters,
            gradient buffers and residuals, momentum) an episode draws from (default (6.5, 8.0, 10.0, 13.0);
            the cheapest menu choices take about 5.7, fp32 everything about 13); empty: no budget.
        reward: the reward's weights (default ``RewardWeights()``).
        controller_kwargs: extra keyword arguments for every controller (e.g. a budget; default none).
    """

    steps: int = 48
    every: int = 8
    micro_batches: int = 2
    batch: int = 16
    context: int = 16
    widths: tuple = (48, 96, 160)
    depths: tuple = (1, 2, 3)
    lrs: tuple = (1e-3, 3e-3)
    text_chars: int = 200_000
    budgets: tuple = (6.5, 8.0, 10.0, 13.0)
    reward: RewardWeights = field(default_factory=RewardWeights)
    controller_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("steps", "every", "micro_batches", "batch", "context", "text_chars"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.every >= self.steps:
            raise ValueError(f"every ({self.every}) must be below steps ({self.steps}) for an episode to have decisions")


_TEXT_CACHE: dict = {}


def corpus_tokens(chars: int) -> tuple[torch.Tensor, int]:
    """The first ``chars`` characters of the shipped corpus as int64 token ids, and the vocabulary size."""
    if chars not in _TEXT_CACHE:
        if not CORPUS.is_file():
            raise FileNotFoundError(f"the corpus the policy environment trains on is missing: {CORPUS}")
        text = CORPUS.read_text(encoding="utf-8")[:chars]
        vocab = sorted(set(text))
        index = {c: i for i, c in enumerate(vocab)}
        _TEXT_CACHE[chars] = (torch.tensor([index[c] for c in text], dtype=torch.int64), len(vocab))
    return _TEXT_CACHE[chars]


class TinyCharLM(nn.Module):
    """Embedding of ``context`` characters, ``depth`` GELU hidden layers of ``width``, next-character logits."""

    def __init__(self, vocab: int, context: int, width: int, depth: int, embed: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        sizes = [context * embed] + [width] * depth
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.out = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens).flatten(1)
        for layer in self.hidden:
            x = F.gelu(layer(x))
        return self.out(x)


def lr_factor(step: int, steps: int, schedule: str) -> float:
    """The learning rate's multiplier: ``"cosine"`` (2 warm-up steps, then cosine to 10 %) or ``"step"``
    (x0.3 from two thirds of the steps on)."""
    if schedule == "step":
        return 0.3 if step >= 2 * steps // 3 else 1.0
    if step < 2:
        return (step + 1) / 2
    return 0.1 + 0.45 * (1 + math.cos(math.pi * step / steps))


def relative_error(x: torch.Tensor, y: torch.Tensor) -> float:
    norm = float(x.norm())
    return float((x - y).norm()) / norm if norm > 0 else 0.0


@torch.no_grad()
def momentum_error(optimizer, param: torch.Tensor, spec: str, state_name: str) -> float:
    """Relative error of storing ``param``'s momentum with the codec ``spec`` resolves to in its optimizer."""
    from ..policy.specs import resolve_codec

    state = optimizer.state.get(param)
    if not state or state_name not in optimizer.plan_of(param):
        return 0.0
    value = optimizer.plan_of(param)[state_name].decode(state, state_name, param).float().clone()
    codec = resolve_codec(spec, "m", param, optimizer.param_groups[0])
    scratch: dict = {}
    codec.init(scratch, state_name, param)
    codec.encode(scratch, state_name, value)
    return relative_error(value, codec.decode(scratch, state_name, param).float())


@torch.no_grad()
def compression_error(controller: Controller, last_grads: dict) -> float:
    """The size-weighted mean of each layer's gradient and momentum error (half each) under its current choice."""
    total, weight = 0.0, 0
    for key, choice in controller.current.items():
        p = controller.params[key]
        grad_err = 0.0
        if choice.grad is not None and key in last_grads:
            comp, g = parse_compressor(choice.grad), last_grads[key]
            grad_err = relative_error(g, comp.decompress(comp.compress(g, salt=key)).reshape(g.shape))
        mom_err = 0.0
        if choice.momentum is not None and controller.optimizer is not None:
            mom_err = momentum_error(controller.optimizer, p, choice.momentum, controller.momentum_state)
        total += p.numel() * (grad_err + mom_err) / 2
        weight += p.numel()
    return total / max(1, weight)


def _takes_loss(controller: Controller) -> bool:
    return "loss" in inspect.signature(controller.step).parameters


def _episode_setup(seed: int, config: EpisodeConfig):
    rng = torch.Generator().manual_seed(seed)
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=rng))]  # noqa: E731
    tokens, vocab = corpus_tokens(config.text_chars)
    width, depth, lr = pick(config.widths), pick(config.depths), pick(config.lrs)
    schedule = pick(("cosine", "step"))
    budget = pick(config.budgets) if config.budgets else None
    torch.manual_seed(seed)
    model = TinyCharLM(vocab, config.context, width, depth)
    info = {"seed": seed, "width": width, "depth": depth, "lr": lr, "schedule": schedule, "budget_bytes_per_param": budget,
            "params": sum(p.numel() for p in model.parameters())}  # fmt: skip
    return model, tokens, rng, info


def _batch(tokens, context, size, rng):
    starts = torch.randint(0, len(tokens) - context - 1, (size,), generator=rng)
    x = torch.stack([tokens[s:s + context] for s in starts.tolist()])
    return x, tokens[starts + context]


def run_episode(make_controller, seed: int, config: EpisodeConfig | None = None) -> dict:
    """Train one tiny model under the controller ``make_controller`` builds; its decisions and rewards.

    Args:
        make_controller: ``(params, gradients=, optimizer=, every=, budget=, **config.controller_kwargs) ->
            Controller`` (``budget`` only when the episode draws one)
            (e.g. ``lambda params, **kw: LearnedController(params, policy=net, **kw)``).
        seed: draws the model, schedule and data (and seeds the model's initialization).
        config: the episode's settings (default ``EpisodeConfig()``).

    Returns a dict: ``info`` (model and schedule drawn), ``controller`` (after the episode), ``decisions``
    (per decision: ``step``, ``loss``, ``memory_saved``, ``compression_error``, ``reward``), ``rewards``,
    ``return`` (their sum), ``final_loss`` (held-out loss at the end) and ``memory_saved`` (mean). The
    global RNG is left as it was.
    """
    config = config or EpisodeConfig()
    with torch.random.fork_rng(devices=[]):
        return _run(make_controller, seed, config)


def _run(make_controller, seed, config):
    model, tokens, rng, info = _episode_setup(seed, config)
    split = int(0.9 * len(tokens))
    train, held_out = tokens[:split], tokens[split:]
    params = list(model.parameters())
    opt = _adamw(params, info["lr"])
    kwargs = dict(config.controller_kwargs)
    if info["budget_bytes_per_param"] is not None:
        kwargs["budget"] = TrainingBudget(bytes_per_param=info["budget_bytes_per_param"])
    ctl = make_controller(params, gradients=ErrorFeedback(Quantize(8)), optimizer=opt, every=config.every, **kwargs)
    last_grads: dict = {}

    def observe(key, grad):
        last_grads[key] = grad.detach().clone()
        ctl.observe(key, grad)

    acc = GradAccumulator(params, ctl.gradients, observer=observe)
    takes_loss = _takes_loss(ctl)
    decisions, losses = [], []
    reference = REFERENCE_BYTES_PER_PARAM * info["params"]
    for step in range(config.steps):
        for group in opt.param_groups:
            group["lr"] = info["lr"] * lr_factor(step, config.steps, info["schedule"])
        step_loss = 0.0
        for _ in range(config.micro_batches):
            x, y = _batch(train, config.context, config.batch, rng)
            loss = F.cross_entropy(model(x), y) / config.micro_batches
            loss.backward()
            step_loss += float(loss.detach())
        acc.step(opt, max_norm=1.0)
        losses.append(step_loss)
        if decisions and (step % config.every == 0 or step == config.steps - 1):
            _close_interval(decisions[-1], losses, model, opt, acc, reference, config.reward)
        if step == config.steps - 1:
            break  # no step follows: no decision
        kwargs = {"loss": step_loss} if takes_loss else {}
        if ctl.step(step, total_steps=config.steps, **kwargs) is not None:
            decisions.append({"step": step, "error": compression_error(ctl, last_grads), "start": len(losses)})
    acc.remove()
    with torch.no_grad():
        x, y = _batch(held_out, config.context, 256, torch.Generator().manual_seed(seed + 1))
        final = float(F.cross_entropy(model(x), y))
    rewards = [d["reward"] for d in decisions]
    return {"info": info, "controller": ctl, "decisions": decisions, "rewards": rewards, "return": sum(rewards),
            "final_loss": final, "memory_saved": sum(d["memory_saved"] for d in decisions) / len(decisions)}  # fmt: skip


def _adamw(params, lr):
    from ..optim import AdamW

    return AdamW(params, lr=lr, weight_decay=0.0, policy=ControllerPolicy(), min_quantize_numel=256)


def _close_interval(decision, losses, model, opt, acc, reference, weights: RewardWeights):
    """Fill in a decision's loss, memory saved and reward at the end of its interval."""
    from ..profiling.training_bytes import training_bytes

    trained = losses[decision["start"]:]
    decision["loss"] = sum(trained) / len(trained) if trained else losses[-1]
    decision["training_bytes"] = int(training_bytes(model, opt, accumulator=acc)["total"])
    decision["memory_saved"] = 1 - decision["training_bytes"] / reference
    decision["compression_error"] = decision.pop("error")
    decision["reward"] = (-weights.alpha * decision["loss"] + weights.beta * decision["memory_saved"]
                          - weights.gamma * decision["compression_error"])  # fmt: skip
