"""Behaviour cloning and PPO for the learned compression policy (``learned.PolicyNetwork``), in plain PyTorch.

One *observation* is one decision: the encoded features of every layer (``[layers, features]``); one
*action* is the three menu indices of every layer (``[layers, 3]``), so an action's log-probability is the sum
over layers and heads, and each decision is one step of an episode (``policy_env.run_episode``).

Behaviour cloning (``behaviour_cloning``): cross-entropy of each head against an expert's choices (labels
``[layers, 3]``; -100 marks a choice the expert did not make, ignored), full-batch Adam steps.

PPO (``ppo_update``; Schulman et al. 2017): advantages either relative to a group (``group_advantages``,
the default: several episodes sampled on the same environment seed, so the same model, schedule, budget and
batches, differ only by the policy's actions; each decision's discounted return-to-go minus the group's mean
at that decision, as RLOO / GRPO do: the loss level, which no action changes much, cancels exactly) or by GAE
over an episode's decisions with the value head as baseline (``gae``), normalized over the batch; the clipped
surrogate objective
``-min(rho A, clip(rho, 1 - eps, 1 + eps) A)`` with ``rho = exp(log pi(a|s) - log pi_old(a|s))``, a value head
fitted to the returns with a Huber loss, and an entropy bonus; ``epochs`` passes over the batch in shuffled
minibatches drawn from a seeded generator, gradients clipped. With the same samples, weights, optimizer state
and generator, an update is reproducible bit for bit (single-threaded CPU).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .learned import PolicyNetwork

IGNORE = -100


@dataclass(frozen=True)
class PPOConfig:
    """PPO's settings.

    Args:
        advantage: ``"group"`` (return-to-go minus the group's mean; default) or ``"gae"`` (value baseline).
        clip: the ratio's clip range epsilon (default 0.2).
        gamma: discount per decision (default 0.95).
        gae_lambda: GAE's lambda (default 0.9).
        epochs: passes over each batch (default 4).
        minibatch: decisions per gradient step (default 8).
        lr: Adam's learning rate (default 1e-3).
        value_coef: weight of the value loss (default 0.5).
        entropy_coef: weight of the entropy bonus (default 0.01).
        max_grad_norm: gradient clipping (default 0.5).
    """

    advantage: str = "group"
    clip: float = 0.2
    gamma: float = 0.95
    gae_lambda: float = 0.9
    epochs: int = 4
    minibatch: int = 8
    lr: float = 1e-3
    value_coef: float = 0.5
    entropy_coef: float = 0.01
    max_grad_norm: float = 0.5

    def __post_init__(self):
        if self.advantage not in ("group", "gae"):
            raise ValueError(f"advantage must be 'group' or 'gae', got {self.advantage!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def returns_to_go(rewards: list[float], gamma: float) -> list[float]:
    """The discounted sum of each decision's reward and those after it."""
    out, running = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        running = rewards[t] + gamma * running
        out[t] = running
    return out


def group_advantages(group: list[list[float]], gamma: float) -> tuple[list[list[float]], list[list[float]]]:
    """Per episode of a group (episodes on the same environment seed, the same number of decisions), each
    decision's return-to-go minus the group's mean return-to-go at that decision; and the returns-to-go."""
    returns = [returns_to_go(r, gamma) for r in group]
    if len({len(r) for r in returns}) > 1:
        raise ValueError(f"group_advantages: the episodes have different numbers of decisions {[len(r) for r in returns]}")
    means = [sum(column) / len(column) for column in zip(*returns)]
    return [[g - m for g, m in zip(r, means)] for r in returns], returns


def gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> tuple[list[float], list[float]]:
    """Generalized advantage estimates and returns of one episode (it ends after its last decision).

    Args:
        rewards: the reward of each decision.
        values: the value head's estimate at each decision.
        gamma: the discount per decision.
        lam: GAE's lambda (1: Monte-Carlo returns minus the value; 0: one-step TD errors).
    """
    if len(rewards) != len(values):
        raise ValueError(f"gae: {len(rewards)} rewards but {len(values)} values")
    advantages, running = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        following = values[t + 1] if t + 1 < len(values) else 0.0
        delta = rewards[t] + gamma * following - values[t]
        running = delta + gamma * lam * running
        advantages[t] = running
    return advantages, [a + v for a, v in zip(advantages, values)]


def imitation_loss(net: PolicyNetwork, samples: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Mean cross-entropy of the three heads against the expert's labels over ``samples`` ((obs, labels))."""
    total, count = 0.0, 0
    for obs, labels in samples:
        logits, _ = net(obs)
        for i, z in enumerate(logits):
            known = labels[:, i] != IGNORE
            if known.any():
                total = total + F.cross_entropy(z[known], labels[known, i], reduction="sum")
                count += int(known.sum())
    if count == 0:
        raise ValueError("imitation_loss: the samples hold no expert choice")
    return total / count


@torch.no_grad()
def imitation_accuracy(net: PolicyNetwork, samples) -> dict:
    """The fraction of the expert's choices the network's most likely choice matches, per head and overall."""
    hits, counts = [0, 0, 0], [0, 0, 0]
    for obs, labels in samples:
        logits, _ = net(obs)
        for i, z in enumerate(logits):
            known = labels[:, i] != IGNORE
            hits[i] += int((z.argmax(-1)[known] == labels[known, i]).sum())
            counts[i] += int(known.sum())
    out = {name: h / max(1, c) for name, h, c in zip(("grad_bits", "keep_fraction", "momentum"), hits, counts)}
    out["all"] = sum(hits) / max(1, sum(counts))
    return out


def behaviour_cloning(net: PolicyNetwork, samples, epochs: int = 200, lr: float = 1e-2, progress=None) -> list[float]:
    """Fit ``net``'s heads to the expert's labels by full-batch Adam steps; the loss before each step.

    Args:
        net: the policy network (trained in place).
        samples: ``[(obs [layers, features], labels [layers, 3])]``.
        epochs: gradient steps (default 200).
        lr: Adam's learning rate (default 1e-2).
        progress: called as ``progress(epoch, loss)`` every 20 steps (default None).
    """
    if not samples:
        raise ValueError("behaviour_cloning needs at least one sample")
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    losses = []
    for epoch in range(epochs):
        loss = imitation_loss(net, samples)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if progress is not None and epoch % 20 == 0:
            progress(epoch, float(loss.detach()))
    return losses


def ppo_update(net: PolicyNetwork, optimizer: torch.optim.Optimizer, batch: list[dict], config: PPOConfig,
               generator: torch.Generator) -> dict:  # fmt: skip
    """One PPO update on ``batch`` (in place); mean policy loss, value loss, entropy and clipped fraction.

    Args:
        net: the policy network.
        optimizer: its optimizer (Adam; its state carries across updates).
        batch: decisions, each ``{"obs", "actions", "log_prob" (at collection), "advantage", "return"}``.
        config: PPO's settings.
        generator: shuffles the minibatches (seed it for a reproducible update).
    """
    if not batch:
        raise ValueError("ppo_update needs at least one decision")
    adv = torch.tensor([d["advantage"] for d in batch])
    adv = (adv - adv.mean()) / (adv.std() + 1e-8) if len(batch) > 1 else adv * 0
    stats = {"policy_loss": 0.0, "value_loss": 0.0, "entropy": 0.0, "clipped": 0.0}
    updates = 0
    for _ in range(config.epochs):
        order = torch.randperm(len(batch), generator=generator).tolist()
        for start in range(0, len(order), config.minibatch):
            idx = order[start:start + config.minibatch]
            policy_loss = value_loss = entropy = clipped = 0.0
            for i in idx:
                d = batch[i]
                log_prob, ent, value = net.evaluate(d["obs"], d["actions"])
                ratio = torch.exp(log_prob - d["log_prob"])
                bounded = torch.clamp(ratio, 1 - config.clip, 1 + config.clip)
                policy_loss = policy_loss - torch.min(ratio * adv[i], bounded * adv[i])
                value_loss = value_loss + F.smooth_l1_loss(value, torch.tensor(float(d["return"])))
                entropy = entropy + ent
                clipped += float(abs(float(ratio.detach()) - 1) > config.clip)
            n = len(idx)
            loss = (policy_loss + config.value_coef * value_loss - config.entropy_coef * entropy) / n
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), config.max_grad_norm)
            optimizer.step()
            for key, value in (("policy_loss", policy_loss), ("value_loss", value_loss), ("entropy", entropy)):
                stats[key] += float(value.detach()) / n
            stats["clipped"] += clipped / n
            updates += 1
    return {k: v / updates for k, v in stats.items()}
