"""Hugging Face ``Trainer`` with any optimizer of the registry, by name.

Two ways, same optimizer (the Trainer's weight-decay grouping: no decay on biases and norm weights;
learning rate, Adam betas/epsilon, weight decay and schedule from ``TrainingArguments``)::

    from efficient_optim.integrations.hf import EfficientOptimTrainer, trainer_optimizers

    # 1. build (optimizer, scheduler) yourself and hand them over
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      optimizers=trainer_optimizers(model, "qadamw4", args))

    # 2. or let a Trainer subclass build it when training starts
    trainer = EfficientOptimTrainer(model=model, args=args, train_dataset=ds,
                                    optimizer_name="hybrid_adam", optimizer_kwargs={"m_codec": "8bit"})

Trainer checkpoints (``save_steps``, ``resume_from_checkpoint``) save ``optimizer.state_dict()`` with
``torch.save`` and load it with ``torch.load(weights_only=True)``: the library's state dicts hold plain
tensors only, keep their codes' dtypes on load, and a resumed run continues the same trajectory (tested
on a tiny GPT-2 in tests/test_integrations.py).
"""

from __future__ import annotations

import torch
from transformers import Trainer, TrainingArguments

from ..registry import create_optimizer

# names whose constructor takes AdamW's (betas, eps): they get TrainingArguments' adam_beta1/2, adam_epsilon
_ADAM_LIKE = ("qadamw", "hybrid_adam", "adamw", "adam", "lowrank_adam")
_NO_DECAY = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def decay_parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two param groups as the Trainer makes them: weight decay on everything but biases and norm weights
    (``LayerNorm`` modules, names containing ``layernorm``/``rmsnorm``/``norm``); frozen parameters left out."""
    from transformers.trainer_pt_utils import get_parameter_names

    decay = set(get_parameter_names(model, [torch.nn.LayerNorm], _NO_DECAY))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
              {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]  # fmt: skip
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, name: str, args: TrainingArguments | None = None,
                    **kwargs) -> torch.optim.Optimizer:  # fmt: skip
    """The registry's optimizer ``name`` over ``model``'s decay groups.

    Args:
        model: the model to train.
        name: a name from ``efficient_optim.list_optimizers()`` (``qadamw8``, ``qadamw4``, ``hybrid_adam``...).
        args: ``TrainingArguments`` to read ``learning_rate``, ``weight_decay`` and, for AdamW-family
            names, ``adam_beta1``, ``adam_beta2``, ``adam_epsilon`` from (optional).
        **kwargs: the optimizer's own settings; they win over ``args``.
    """
    weight_decay = kwargs.pop("weight_decay", args.weight_decay if args is not None else 0.0)
    settings: dict = {}
    if args is not None:
        settings["lr"] = args.learning_rate
        if name.startswith(_ADAM_LIKE):
            settings["betas"] = (args.adam_beta1, args.adam_beta2)
            settings["eps"] = args.adam_epsilon
    settings.update(kwargs)
    return create_optimizer(name, decay_parameter_groups(model, weight_decay), **settings)


def trainer_optimizers(model: torch.nn.Module, name: str, args: TrainingArguments, *,
                       num_training_steps: int | None = None, **kwargs):  # fmt: skip
    """``(optimizer, scheduler)`` for ``Trainer(optimizers=...)``.

    The scheduler is ``transformers.get_scheduler(args.lr_scheduler_type, ...)`` with the arguments'
    warm-up, over ``num_training_steps`` (default: ``args.max_steps``, which must then be set).
    ``**kwargs`` go to the optimizer (see ``build_optimizer``).
    """
    from transformers import get_scheduler

    steps = num_training_steps if num_training_steps is not None else args.max_steps
    if steps is None or steps <= 0:
        raise ValueError("trainer_optimizers needs num_training_steps (or TrainingArguments.max_steps > 0) for the "
                         "learning-rate schedule")  # fmt: skip
    optimizer = build_optimizer(model, name, args, **kwargs)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.get_warmup_steps(steps),
                              num_training_steps=steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs or {})  # fmt: skip
    return optimizer, scheduler


class EfficientOptimTrainer(Trainer):
    """A ``Trainer`` whose optimizer is the registry's ``optimizer_name`` (built by ``build_optimizer`` when
    training starts; the Trainer makes the scheduler from its arguments as usual).

    Args:
        optimizer_name: a registry name (default ``"qadamw8"``).
        optimizer_kwargs: the optimizer's own settings (``{"bits": 4}``, ``{"m_codec": "8bit"}``, ...); a
            keyword the optimizer does not take, or one its settings ignore, raises a clear error when it is built.
        *args, **kwargs: ``Trainer``'s.
    """

    def __init__(self, *args, optimizer_name: str = "qadamw8", optimizer_kwargs: dict | None = None, **kwargs):
        self.optimizer_name = optimizer_name
        self.optimizer_kwargs = dict(optimizer_kwargs or {})
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            self.optimizer = build_optimizer(opt_model, self.optimizer_name, self.args, **self.optimizer_kwargs)
        return self.optimizer
