"""One fine-tuning run: a pretrained causal LM with a classification head, trained by one optimizer.

``SequenceClassifier`` puts a linear head on the mean of the LM body's last hidden states over the real
(unpadded) tokens. ``finetune_once`` trains it with any registry optimizer (the harness's spec form and
learning-rate multipliers; warm-up + cosine schedule, gradient clipping) on seeded batches and measures
test accuracy. The head's initialization, the batch order and the optimizer's stochastic rounding follow
the run's seed; the pretrained body is the same for every run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..profiling import state_bytes
from ..registry import create_optimizer
from .config import LR_SCALE, WEIGHT_DECAY_SCALE, RunConfig, parse_spec
from .train import lr_factor


class SequenceClassifier(torch.nn.Module):
    """A causal LM's body (``lm.base_model``: the transformer without its LM head) and a linear head.

    Args:
        lm: a ``transformers`` causal LM (GPT-2 or LLaMA from ``bench.models``).
        classes: number of classes.
        seed: seeds the head's initialization.
    """

    def __init__(self, lm: torch.nn.Module, classes: int, seed: int):
        super().__init__()
        self.body = lm.base_model
        torch.manual_seed(seed)
        self.head = torch.nn.Linear(lm.config.hidden_size, classes)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.body(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * m).sum(1) / m.sum(1).clamp_min(1.0))


@dataclass
class FinetuneSettings:
    """How a fine-tuning run trains.

    Args:
        steps: optimizer steps (default 200).
        batch_size: examples per step (default 32).
        lr: peak learning rate on AdamW's scale (Lion 0.1x, SGD 30x, as in the harness; default 1e-3).
        warmup: linear warm-up steps (default 30), then cosine decay to ``min_lr_ratio`` (default 0.1).
        weight_decay: decoupled weight decay on AdamW's scale (default 0.01).
        clip: gradient-norm clipping (default 1.0; 0 disables).
        eval_batch: examples per evaluation forward pass (default 256).
    """

    steps: int = 200
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    clip: float = 1.0
    eval_batch: int = 256

    def validate(self) -> None:
        for key in ("steps", "batch_size", "eval_batch"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not self.lr > 0 or self.warmup < 0 or self.weight_decay < 0 or self.clip < 0:
            raise ValueError("lr must be > 0 and warmup, weight_decay, clip >= 0")

    def schedule(self) -> RunConfig:
        """A ``RunConfig`` carrying these settings' schedule, for the harness's warm-up + cosine ``lr_factor``."""
        return RunConfig(steps=self.steps, warmup_steps=max(1, min(self.warmup, self.steps)), min_lr_ratio=self.min_lr_ratio)


@torch.no_grad()
def accuracy(model: SequenceClassifier, ids, mask, labels, batch: int = 256) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of ``model`` on the encoded examples."""
    was = model.training
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(labels), batch):
        logits = model(ids[i : i + batch], mask[i : i + batch]).float()
        y = labels[i : i + batch]
        correct += int((logits.argmax(-1) == y).sum())
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
    model.train(was)
    return correct / len(labels), loss / len(labels)


def _optimizer(spec: str, model: torch.nn.Module, s: FinetuneSettings, seed: int):
    name, kwargs = parse_spec(spec)
    base = {"lr": s.lr * LR_SCALE.get(name, 1.0), "weight_decay": s.weight_decay * WEIGHT_DECAY_SCALE.get(name, 1.0)}
    opt = create_optimizer(name, model, **{**base, **kwargs})
    if "seed" not in kwargs:  # our optimizers seed stochastic rounding per group: tie it to the run's seed
        for group in opt.param_groups:
            if "seed" in group:
                group["seed"] = seed
    return opt


def finetune_once(lm: torch.nn.Module, spec: str, train, test, classes: int, seed: int, s: FinetuneSettings) -> dict:
    """Fine-tune ``lm`` (changed in place: pass a fresh copy) with optimizer ``spec`` and return its result.

    Args:
        lm: the pretrained LM (or a freshly initialized one, for the from-scratch control).
        spec: optimizer spec (``name[+key=value...]``).
        train, test: ``(ids, mask, labels)`` from ``classification_data.encode``.
        classes: number of classes.
        seed: seeds the head, the batch order and stochastic rounding.
        s: the training settings.

    Returns:
        ``{"test_accuracy", "test_loss", "train_loss" (mean of the last 10 % of steps), "diverged_at",
        "state_bytes", "seconds"}``; a run whose loss goes NaN/Inf stops with ``diverged_at`` set.
    """
    s.validate()
    model = SequenceClassifier(lm, classes, seed)
    opt = _optimizer(spec, model, s, seed)
    sched_cfg = s.schedule()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_factor(k, sched_cfg))
    gen = torch.Generator().manual_seed(seed)
    ids, mask, labels = train
    params = [p for p in model.parameters() if p.requires_grad]
    losses, diverged_at, t0 = [], None, time.perf_counter()
    model.train()
    for step in range(s.steps):
        idx = torch.randint(0, len(labels), (s.batch_size,), generator=gen)
        loss = F.cross_entropy(model(ids[idx], mask[idx]).float(), labels[idx])
        if not math.isfinite(loss.item()):
            diverged_at = step + 1
            break
        loss.backward()
        if s.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, s.clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    tail = losses[-max(1, s.steps // 10) :]
    out = {"train_loss": sum(tail) / len(tail) if tail else None, "diverged_at": diverged_at,
           "state_bytes": state_bytes(opt), "seconds": time.perf_counter() - t0}  # fmt: skip
    if diverged_at is None:
        out["test_accuracy"], out["test_loss"] = accuracy(model, *test, batch=s.eval_batch)
    else:
        out["test_accuracy"] = out["test_loss"] = None
    return out
