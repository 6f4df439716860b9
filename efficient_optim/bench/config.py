"""One benchmark run's settings: a plain dataclass that round-trips through ``config.json``.

An optimizer is named by a *spec*: a registry name optionally followed by settings,
``qadamw4+m_map=softsign+rounding=stochastic`` or ``lowrank_adam+rank=16``. Values are parsed as int,
float, bool (``true``/``false``) or left as strings.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

from ..optimizer_specs import parse_spec, parse_value  # noqa: F401  (re-exported: bench.config.parse_spec)

# Learning-rate multipliers against AdamW's for rules whose usual learning rate differs by an order of
# magnitude (Lion: sign updates of size 1, so ~1/10 of AdamW's, with ~3-10x the weight decay, as its
# paper recommends; SGD: no per-coordinate normalization). ``+lr=`` in a spec overrides them.
LR_SCALE = {"lion": 0.1, "lion8": 0.1, "lion_bnb_8bit": 0.1, "sgd": 30.0, "sgd8": 30.0}
WEIGHT_DECAY_SCALE = {"lion": 10.0, "lion8": 10.0, "lion_bnb_8bit": 10.0, "sgd": 0.0, "sgd8": 0.0, "adam": 0.0}
# The main job's (``effopt bench``) peak lr and warm-up steps, from an lr x warm-up sweep of AdamW on its own
# setting (BENCHMARKS.md, "AdamW's learning rate and warm-up for the main job"): with a 75-step warm-up, lr 3e-3
# gave a final val loss of 2.193 +- 0.005 over 3 seeds (the former 12-step warm-up: 2.394 +- 0.033).
MAIN_JOB_LR = 3e-3
MAIN_JOB_WARMUP = 75
# The held-out part of a corpus (its last 10 %): validation, and the test split carved from its end.
HELD_OUT_FRACTION = 0.1
DEFAULT_TEST_FRACTION = 0.05
# A setting missing from a saved config.json / plan.json takes the value that reproduces what that folder's runs
# did, not today's default: folders written before the test split existed evaluated on the whole held-out tail.
LEGACY_VALUES = {"test_fraction": 0.0}


def slug(text: str) -> str:
    """A folder-safe name for a spec or a settings label."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_") or "default"


@dataclass
class RunConfig:
    """Everything that defines one training run (one optimizer, one seed, one setting).

    Args:
        optimizer: optimizer spec, ``name[+key=value...]`` (see ``parse_spec``).
        seed: seeds model init, batch order and the optimizer's stochastic rounding. Default 0.
        model: LM preset from ``bench.models.LM_PRESETS`` or ``digits-cnn``. Default ``gpt2-tiny``.
        layers, width, heads: override the preset's depth, hidden size and heads (``None`` keeps it).
        data: ``embedded`` (default; no download), ``wikitext-2``/``wikitext-103``, or a text file/folder.
        tokenizer: ``bytes`` (vocabulary 256, default) or ``bpe`` (byte-level BPE of ``vocab_size``).
        vocab_size: BPE vocabulary size. Default 4096.
        context: sequence length (``None``: 64 capped by the preset's context).
        batch_size: sequences per micro-batch. Default 16.
        grad_accum: micro-batches per optimizer step. Default 1.
        steps: optimizer steps. Default 250.
        lr: peak learning rate for AdamW-like rules (scaled by ``LR_SCALE`` for Lion/SGD). Default 3e-3.
        min_lr_ratio: the cosine decays to ``lr * min_lr_ratio``. Default 0.1.
        warmup_steps: linear warm-up steps (``None``: 5 % of ``steps``, at least 1).
        weight_decay: decoupled weight decay (scaled by ``WEIGHT_DECAY_SCALE``). Default 0.1.
        clip: gradient-norm clipping threshold (``0`` disables). Default 1.0.
        eval_every: evaluate on validation every N steps (``0``: only at the end; ``None``, the default: five
            times per run, every ``steps // 5`` steps, so curves show validation and the cost stays ~5 %).
        eval_batches: validation batches per evaluation (fixed, the same for every run); the test split is
            evaluated on as many. Default 16.
        test_fraction: the part of the data held out as the *test* split, evaluated once at the end of the run
            and never used for a decision (default 0.05; ``0``: no test split). Text corpora: the last
            ``test_fraction`` of the text; validation is the rest of the held-out last 10 % (train: the first
            90 %, unchanged). Digits: as many samples, from the validation samples. Must be below 0.1.
        log_every: write a ``metrics.jsonl`` line every N steps. Default 10.
        checkpoint_every: save a resumable checkpoint every N steps (``0``: never). Default 100.
        target_ppl: report the first evaluated step whose validation perplexity is at or below this.
        sharpness_iters: at the end of the run, estimate the top positive Hessian eigenvalue of the training
            loss on one fixed batch with this many power iterations (each about two backward passes, twice as
            many when a negative eigenvalue dominates; ``0``, the default: skip). Recorded as ``sharpness``
            in the run's summary row.
        device: ``cpu``, ``cuda`` or ``auto`` (CUDA when available). Default ``auto``.
        param_dtype: dtype the model's parameters are stored in: ``float32`` (default), ``bfloat16`` or
            ``float16`` (then the optimizer's ``correction_bits`` / ``weight_rounding`` decide how updates
            are kept; e.g. ``qadamw8+correction_bits=16``).
        grad_release: step each parameter during backward and free its gradient (our optimizers only;
            needs ``clip=0`` and ``grad_accum=1``). Default False.
        grad_compression: compress the gradients (``bench.mango_callback``): a compressor spec with error
            feedback, ``q8``, ``q4``, ``top10%/q8``, ``rand10%+residual=none``, or ``dgc+fraction=0.01``
            (default None: plain gradients). With ``grad_accum`` >= 1 and one of this library's optimizers the
            micro-batches are accumulated in compressed buffers (``compress.GradAccumulator``).
        controller: a controller that chooses each layer's gradient and momentum compression over training
            (``bench.mango_callback``): ``kind[+key=value...]``, e.g. ``rules+every=25+budget_bpp=8``
            (default None: none).
        settings: a label for the setting this run belongs to in a matrix (``default``).
    """

    optimizer: str = "adamw"
    seed: int = 0
    model: str = "gpt2-tiny"
    layers: int | None = None
    width: int | None = None
    heads: int | None = None
    data: str = "embedded"
    tokenizer: str = "bytes"
    vocab_size: int = 4096
    context: int | None = None
    batch_size: int = 16
    grad_accum: int = 1
    steps: int = 250
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None
    weight_decay: float = 0.1
    clip: float = 1.0
    eval_every: int | None = None
    eval_batches: int = 16
    test_fraction: float = DEFAULT_TEST_FRACTION
    log_every: int = 10
    checkpoint_every: int = 100
    target_ppl: float | None = None
    sharpness_iters: int = 0
    device: str = "auto"
    param_dtype: str = "float32"
    grad_release: bool = False
    grad_compression: str | None = None
    controller: str | None = None
    settings: str = "default"

    def validate(self) -> None:
        """``ValueError`` naming the first invalid setting."""
        parse_spec(self.optimizer)
        positive = {"steps": self.steps, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "eval_batches": self.eval_batches, "log_every": self.log_every}  # fmt: skip
        for key, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        for key in ("eval_every", "checkpoint_every", "sharpness_iters"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.clip < 0 or self.weight_decay < 0:
            raise ValueError("clip and weight_decay must be >= 0")
        if not (isinstance(self.test_fraction, (int, float)) and 0 <= self.test_fraction < HELD_OUT_FRACTION):
            raise ValueError(f"test_fraction must be in [0, {HELD_OUT_FRACTION}) (the test split is carved from the "
                             f"held-out last {HELD_OUT_FRACTION:.0%} of the data), got {self.test_fraction!r}")
        if self.tokenizer not in ("bytes", "bpe"):
            raise ValueError(f"tokenizer must be 'bytes' or 'bpe', got {self.tokenizer!r}")
        if self.param_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"param_dtype must be float32, bfloat16 or float16, got {self.param_dtype!r}")
        if self.grad_release and (self.clip > 0 or self.grad_accum > 1):
            raise ValueError(
                "grad_release steps each parameter during backward: global clipping (clip > 0) and gradient "
                "accumulation (grad_accum > 1) cannot work with it; set clip=0 and grad_accum=1"
            )
        if self.grad_compression is not None or self.controller is not None:
            from .mango_callback import check_run_options

            check_run_options(self)
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be cpu, cuda[:N] or auto, got {self.device!r}")

    @property
    def eval_interval(self) -> int:
        """Steps between evaluations: ``eval_every``, or ``steps // 5`` (at least 1) when it is ``None``."""
        return max(1, self.steps // 5) if self.eval_every is None else self.eval_every

    @property
    def run_id(self) -> str:
        """``<optimizer spec>/<settings>/seed<N>``: the run's folder under the output folder."""
        return f"{slug(self.optimizer)}/{slug(self.settings)}/seed{self.seed}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        """The config saved as ``data`` (``to_dict``); a setting it lacks takes its ``LEGACY_VALUES`` value
        (what runs did before the setting existed), else its default. ``ValueError`` for unknown settings."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown run settings: {', '.join(unknown)}")
        return cls(**{**{k: v for k, v in LEGACY_VALUES.items() if k not in data}, **data})

    def lr_factor(self, step: int) -> float:
        """The learning-rate multiplier at ``step`` (0-based): linear warm-up to 1 over ``warmup_steps`` (default
        5 % of ``steps``, at least 1), then cosine decay to ``min_lr_ratio`` at ``steps``."""
        warmup = self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 20)
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, self.steps - warmup))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def build_task(self, device=None):
        """The run's task (``bench.tasks``: data, model builder, batches, loss, evaluation), validated.

        Args:
            device: where batches go (default: ``self.device`` resolved: ``auto`` -> CUDA when available).
        """
        from .tasks import build_task
        from .train import resolve_device

        self.validate()
        return build_task(self, resolve_device(self.device) if device is None else device)

    def optimizer_kwargs(self) -> tuple[str, dict]:
        """Registry name and keyword arguments: ``lr``/``weight_decay`` (scaled per rule) then the spec's."""
        name, kwargs = parse_spec(self.optimizer)
        out = {"lr": self.lr * LR_SCALE.get(name, 1.0), "weight_decay": self.weight_decay * WEIGHT_DECAY_SCALE.get(name, 1.0)}
        out.update(kwargs)
        return name, out
