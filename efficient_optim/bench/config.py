"""One benchmark run's settings: a plain dataclass that round-trips through ``config.json``.

An optimizer is named by a *spec*: a registry name optionally followed by settings,
``qadamw4+m_map=softsign+rounding=stochastic`` or ``lowrank_adam+rank=16``. Values are parsed as int,
float, bool (``true``/``false``) or left as strings.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

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


def parse_value(text: str):
    """``"16"`` -> 16, ``"1e-3"`` -> 0.001, ``"true"`` -> True, anything else stays a string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_spec(spec: str) -> tuple[str, dict]:
    """``"qadamw4+m_map=softsign"`` -> ``("qadamw4", {"m_map": "softsign"})``; ``ValueError`` if malformed."""
    name, *pairs = spec.strip().split("+")
    if not name:
        raise ValueError(f"empty optimizer name in spec {spec!r}")
    kwargs = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"optimizer spec {spec!r}: setting {pair!r} must look like key=value")
        key, value = pair.split("=", 1)
        kwargs[key] = parse_value(value)
    return name, kwargs


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
        eval_batches: validation batches per evaluation (fixed, the same for every run). Default 16.
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
    log_every: int = 10
    checkpoint_every: int = 100
    target_ppl: float | None = None
    sharpness_iters: int = 0
    device: str = "auto"
    param_dtype: str = "float32"
    grad_release: bool = False
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
        if self.tokenizer not in ("bytes", "bpe"):
            raise ValueError(f"tokenizer must be 'bytes' or 'bpe', got {self.tokenizer!r}")
        if self.param_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"param_dtype must be float32, bfloat16 or float16, got {self.param_dtype!r}")
        if self.grad_release and (self.clip > 0 or self.grad_accum > 1):
            raise ValueError(
                "grad_release steps each parameter during backward: global clipping (clip > 0) and gradient "
                "accumulation (grad_accum > 1) cannot work with it; set clip=0 and grad_accum=1"
            )
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
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown run settings: {', '.join(unknown)}")
        return cls(**data)

    def optimizer_kwargs(self) -> tuple[str, dict]:
        """Registry name and keyword arguments: ``lr``/``weight_decay`` (scaled per rule) then the spec's."""
        name, kwargs = parse_spec(self.optimizer)
        out = {"lr": self.lr * LR_SCALE.get(name, 1.0), "weight_decay": self.weight_decay * WEIGHT_DECAY_SCALE.get(name, 1.0)}
        out.update(kwargs)
        return name, out
