"""Lightning: return ``configure_optimizers(self, "qadamw4", lr=...)`` from ``LightningModule.configure_optimizers``.

::

    import lightning as L
    from efficient_optim.integrations.lightning import configure_optimizers

    class Model(L.LightningModule):
        ...
        def configure_optimizers(self):
            return configure_optimizers(self, "hybrid_adam", lr=1e-3, weight_decay=0.1,
                                        warmup_steps=100, total_steps=self.trainer.max_steps)

Nothing here imports Lightning: the optimizers are ordinary ``torch.optim.Optimizer``s (``step(closure)``
is supported, as Lightning's automatic optimization needs), and their state dicts go into Lightning
checkpoints and come back with ``ckpt_path=`` unchanged (tested in tests/test_integrations.py).
"""

from __future__ import annotations

import math

import torch

from ..registry import create_optimizer


def decay_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (>= 2-D), none on biases and norm weights; frozen parameters left out."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    groups = [{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0}]  # fmt: skip
    return [g for g in groups if g["params"]]


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    """``LambdaLR`` factor: linear warm-up over ``warmup_steps``, cosine decay to ``min_ratio`` at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def configure_optimizers(module: torch.nn.Module, name: str, *, lr: float, weight_decay: float = 0.0,
                         warmup_steps: int = 0, total_steps: int | None = None, **kwargs) -> dict:  # fmt: skip
    """What ``LightningModule.configure_optimizers`` returns, for the registry's optimizer ``name``.

    Args:
        module: the LightningModule (any ``nn.Module``).
        name: a name from ``efficient_optim.list_optimizers()``.
        lr, weight_decay: the optimizer's (decay on >= 2-D parameters only).
        warmup_steps, total_steps: with ``total_steps``, a per-step warm-up + cosine schedule
            (``{"lr_scheduler": {"scheduler": ..., "interval": "step"}}``); without, no scheduler.
        **kwargs: the optimizer's own settings (``bits``, ``rank``, ...).
    """
    optimizer = create_optimizer(name, decay_groups(module, weight_decay), lr=lr, **kwargs)
    if total_steps is None:
        return {"optimizer": optimizer}
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, total_steps))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
