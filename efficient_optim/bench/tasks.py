"""What a benchmark run trains: a causal LM on a token corpus, or the digits CNN.

A task builds its model, draws training batches from a ``torch.Generator`` (so the batch order is fixed
by the seed and resumable from the generator's state), computes the loss, and evaluates on a fixed set of
validation batches that is the same for every run.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .config import RunConfig
from .data import get_corpus, token_data
from .models import DigitsCNN, build_lm, lm_preset, load_digits_tensors

EVAL_SEED = 1234  # validation batches are drawn from this seed, whatever the run's seed


class LMTask:
    """Next-token prediction on a corpus with a preset causal LM.

    Args:
        cfg: the run's settings (model preset and overrides, data, tokenizer, context, batch size).
        device: where batches are placed.
    """

    unit = "tokens"

    def __init__(self, cfg: RunConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self.preset = lm_preset(cfg.model, layers=cfg.layers, width=cfg.width, heads=cfg.heads)
        self.context = cfg.context or self.preset.context
        if self.context > self.preset.context:
            raise ValueError(f"context {self.context} is longer than the model's {self.preset.context} positions")
        data = token_data(get_corpus(cfg.data), cfg.tokenizer, cfg.vocab_size)
        self.train, self.val, self.vocab_size = data.train, data.val, data.vocab_size
        for split, arr in (("training", self.train), ("validation", self.val)):
            if len(arr) < self.context + 2:
                raise ValueError(
                    f"the {split} split of {cfg.data!r} has {len(arr)} tokens, fewer than one sequence of "
                    f"{self.context + 1}: use a larger corpus or a shorter --context"
                )
        self.items_per_batch = cfg.batch_size * self.context

    def build_model(self) -> torch.nn.Module:
        cfg = self.cfg
        return build_lm(cfg.model, self.vocab_size, cfg.seed, layers=cfg.layers, width=cfg.width,
                        heads=cfg.heads)  # fmt: skip

    def _batch(self, tokens: np.ndarray, gen: torch.Generator) -> torch.Tensor:
        starts = torch.randint(0, len(tokens) - self.context - 1, (self.cfg.batch_size,), generator=gen)
        rows = np.stack([np.asarray(tokens[s : s + self.context + 1], dtype=np.int64) for s in starts.tolist()])
        return torch.from_numpy(rows).to(self.device)

    def train_batch(self, gen: torch.Generator) -> torch.Tensor:
        return self._batch(self.train, gen)

    def loss(self, model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        logits = model(batch[:, :-1]).logits
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, autocast) -> dict:
        """Mean validation loss over ``eval_batches`` fixed batches, and its perplexity."""
        gen = torch.Generator().manual_seed(EVAL_SEED)
        was_training = model.training
        model.eval()
        total = 0.0
        for _ in range(self.cfg.eval_batches):
            with autocast():
                total += self.loss(model, self._batch(self.val, gen)).item()
        model.train(was_training)
        val = total / self.cfg.eval_batches
        return {"val_loss": val, "val_ppl": math.exp(min(val, 50.0))}


class DigitsTask:
    """Classification of scikit-learn's 8x8 digits with ``DigitsCNN`` (a second architecture).

    Perplexity here is ``exp(cross-entropy)`` like for the LM, and accuracy is reported beside it.
    """

    unit = "samples"

    def __init__(self, cfg: RunConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        xt, yt, xv, yv = load_digits_tensors()
        self.xt, self.yt, self.xv, self.yv = xt.to(device), yt.to(device), xv.to(device), yv.to(device)
        self.items_per_batch = cfg.batch_size

    def build_model(self) -> torch.nn.Module:
        torch.manual_seed(self.cfg.seed)
        return DigitsCNN()

    def train_batch(self, gen: torch.Generator):
        idx = torch.randint(0, len(self.yt), (self.cfg.batch_size,), generator=gen).to(self.device)
        return self.xt[idx], self.yt[idx]

    def loss(self, model: torch.nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x.to(model.head[-1].weight.dtype)).float(), y)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, autocast) -> dict:
        was_training = model.training
        model.eval()
        with autocast():
            logits = model(self.xv.to(model.head[-1].weight.dtype)).float()
        model.train(was_training)
        val = F.cross_entropy(logits, self.yv).item()
        acc = (logits.argmax(-1) == self.yv).float().mean().item()
        return {"val_loss": val, "val_ppl": math.exp(min(val, 50.0)), "val_accuracy": acc}


def build_task(cfg: RunConfig, device: torch.device):
    """The task for ``cfg.model``: ``digits-cnn`` or an LM preset."""
    if cfg.model == "digits-cnn":
        return DigitsTask(cfg, device)
    return LMTask(cfg, device)
