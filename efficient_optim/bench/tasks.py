"""What a benchmark run trains: a causal LM on a token corpus, or the digits CNN.

A task builds its model, draws training batches from a ``torch.Generator`` (so the batch order is fixed
by the seed and resumable from the generator's state), computes the loss, and evaluates on a fixed set of
validation batches that is the same for every run, or (``split="test"``, once at the end of a run) on the
held-out test split (``RunConfig.test_fraction``), which no decision ever looks at.

The surface other packages use (``analysis.decomposition`` takes a task object): ``cfg`` (the run's
``RunConfig``), ``device``, ``build_model()``, ``train_batch(generator)``, ``loss(model, batch)``,
``evaluate(model, autocast, split)``, ``has_test``, ``items_per_batch`` and ``unit``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .config import RunConfig
from .data import get_corpus, token_data
from .models import DigitsCNN, build_lm, lm_preset, load_digits_tensors

EVAL_SEED = 1234  # validation (and test) batches are drawn from this seed, whatever the run's seed
SPLITS = ("val", "test")


def _check_split(split: str, has_test: bool) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "test" and not has_test:
        raise ValueError("this run has no test split (test_fraction = 0)")


def _losses(split: str, loss: float, **extra) -> dict:
    """``{"<split>_loss", "<split>_ppl", ...}``: the loss and its perplexity ``exp(loss)`` (capped at e^50)."""
    return {f"{split}_loss": loss, f"{split}_ppl": math.exp(min(loss, 50.0)), **{f"{split}_{k}": v for k, v in extra.items()}}


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
        data = token_data(get_corpus(cfg.data), cfg.tokenizer, cfg.vocab_size, test_fraction=cfg.test_fraction)
        self.train, self.val, self.test, self.vocab_size = data.train, data.val, data.test, data.vocab_size
        for split, arr in (("training", self.train), ("validation", self.val), ("test", self.test)):
            if arr is not None and len(arr) < self.context + 2:
                raise ValueError(
                    f"the {split} split of {cfg.data!r} has {len(arr)} tokens, fewer than one sequence of "
                    f"{self.context + 1}: use a larger corpus or a shorter --context"
                )
        self.items_per_batch = cfg.batch_size * self.context

    @property
    def has_test(self) -> bool:
        """Whether the run has a test split (``cfg.test_fraction > 0``)."""
        return self.test is not None

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
    def evaluate(self, model: torch.nn.Module, autocast, split: str = "val") -> dict:
        """Mean loss over ``eval_batches`` fixed batches of a held-out split, and its perplexity.

        Args:
            model: the model (put in eval mode for the evaluation, then back).
            autocast: a context-manager factory (``contextlib.nullcontext`` on CPU).
            split: ``"val"`` (default: ``{"val_loss", "val_ppl"}``) or ``"test"`` (``{"test_loss", "test_ppl"}``).
        """
        _check_split(split, self.has_test)
        tokens = self.val if split == "val" else self.test
        gen = torch.Generator().manual_seed(EVAL_SEED)
        was_training = model.training
        model.eval()
        total = 0.0
        for _ in range(self.cfg.eval_batches):
            with autocast():
                total += self.loss(model, self._batch(tokens, gen)).item()
        model.train(was_training)
        return _losses(split, total / self.cfg.eval_batches)


class DigitsTask:
    """Classification of scikit-learn's 8x8 digits with ``DigitsCNN`` (a second architecture).

    Perplexity here is ``exp(cross-entropy)`` like for the LM, and accuracy is reported beside it. The test
    split is the last ``round(1797 * test_fraction)`` of the (seeded) validation samples.
    """

    unit = "samples"

    def __init__(self, cfg: RunConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        xt, yt, xv, yv = load_digits_tensors()
        n_test = round((len(yt) + len(yv)) * cfg.test_fraction)
        cut = len(yv) - n_test
        self.xt, self.yt, self.xv, self.yv = xt.to(device), yt.to(device), xv[:cut].to(device), yv[:cut].to(device)
        self.x_test, self.y_test = xv[cut:].to(device), yv[cut:].to(device)
        self.items_per_batch = cfg.batch_size

    @property
    def has_test(self) -> bool:
        """Whether the run has a test split (``cfg.test_fraction > 0``)."""
        return len(self.y_test) > 0

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
    def evaluate(self, model: torch.nn.Module, autocast, split: str = "val") -> dict:
        """Loss, perplexity and accuracy on every sample of a held-out split (``"val"`` or ``"test"``); see
        ``LMTask.evaluate``."""
        _check_split(split, self.has_test)
        x, y = (self.xv, self.yv) if split == "val" else (self.x_test, self.y_test)
        was_training = model.training
        model.eval()
        with autocast():
            logits = model(x.to(model.head[-1].weight.dtype)).float()
        model.train(was_training)
        loss = F.cross_entropy(logits, y).item()
        return _losses(split, loss, accuracy=(logits.argmax(-1) == y).float().mean().item())


def build_task(cfg: RunConfig, device: torch.device):
    """The task for ``cfg.model``: ``digits-cnn`` or an LM preset."""
    if cfg.model == "digits-cnn":
        return DigitsTask(cfg, device)
    return LMTask(cfg, device)
