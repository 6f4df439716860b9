"""Optimizers by the names users type: ``create_optimizer("qadamw8", model, lr=1e-3)``.

Names follow Hugging Face ``OptimizerNames`` where one exists. External baselines (bitsandbytes, torchao)
are adapters, imported only when their optimizer is built (inside ``third_party.quiet``, so a job can keep
their chatter in a log file): a missing package raises ``ImportError`` saying what to install. A keyword the
optimizer does not take raises ``UnknownOptionError`` naming the registry name and listing the valid ones.

This library's optimizers also take a memory budget as plain settings (``budget_bpp=1.5`` or
``budget_bytes=N``, with ``allocator``, ``warmup``, ``every``, ``patience``; ``policy.budget_options``): they
are built with ``policy=Budget(...)`` and, from a model, with its parameter names (the fixed rule finds the
embeddings by name).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from .policy.budget_options import BUDGET_KEYS, has_budget_options, split_budget
from .third_party import quiet


class UnknownOptionError(TypeError, ValueError):
    """A keyword the named optimizer does not take (a ``TypeError`` like Python's own for an unexpected
    keyword, and a ``ValueError`` like every other invalid setting of this library)."""


@dataclass(frozen=True)
class OptimizerEntry:
    """One registered name.

    Args:
        name: the name users type.
        factory: ``factory(params, **kwargs) -> torch.optim.Optimizer``.
        description: one line for ``effopt list``.
        requires: the pip package that must be installed (``None`` for our own and torch's).
        cuda_only: True when the optimizer cannot run without a CUDA device.
        takes_model: the factory receives ``params_or_model`` as given (a model when the user passed one).
        target: ``"module:Class"`` of the optimizer the factory builds (its keywords are the valid ones);
            ``None`` to skip the keyword check.
    """

    name: str
    factory: Callable[..., torch.optim.Optimizer]
    description: str
    requires: str | None = None
    cuda_only: bool = False
    takes_model: bool = False
    target: str | None = None

    def available(self) -> bool:
        """Whether the optional package this entry needs is importable."""
        if self.requires is None:
            return True
        return importlib.util.find_spec(self.requires.split("[")[0].replace("-", "_")) is not None

    @property
    def ours(self) -> bool:
        """Whether this entry builds one of this library's optimizers (they may use the fused CPU kernel)."""
        return self.target is not None and self.target.startswith("efficient_optim.")

    def target_class(self) -> type | None:
        """The optimizer class ``target`` names (imports its module), or ``None`` without a target."""
        if self.target is None:
            return None
        module, _, cls = self.target.partition(":")
        return getattr(importlib.import_module(module), cls)

    def keywords(self) -> list[str] | None:
        """The keyword arguments ``create_optimizer(self.name, ...)`` accepts, sorted; ``None`` if open-ended."""
        own, open_ended = _keywords(self.factory, skip=1)
        if not open_ended:
            return sorted(own)
        cls = self.target_class()
        inherited = _class_keywords(cls) if cls is not None else None
        if inherited is None:
            return None
        budget = set(BUDGET_KEYS) if self.ours and "policy" in inherited else set()
        return sorted(own | inherited | budget)

    @property
    def takes_budget(self) -> bool:
        """Whether a memory budget (``budget_bpp=`` / ``budget_bytes=``) can be given to this optimizer."""
        return self.ours and "budget_bpp" in (self.keywords() or ())

    def check_keywords(self, kwargs: dict) -> None:
        """``UnknownOptionError`` naming this entry and its valid keywords if ``kwargs`` holds any other."""
        valid = self.keywords()
        unknown = [k for k in kwargs if valid is not None and k not in valid]
        if not unknown:
            return
        hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, valid, n=1)) else repr(k)
                 for k in unknown]  # fmt: skip
        raise UnknownOptionError(f"optimizer {self.name!r} has no option {', '.join(hints)}; "
                                 f"its options: {', '.join(valid)}")  # fmt: skip


def _keywords(fn: Callable, skip: int) -> tuple[set[str], bool]:
    """Keyword names ``fn`` takes after its first ``skip`` parameters, and whether it also takes ``**kwargs``."""
    params = list(inspect.signature(fn).parameters.values())[skip:]
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def _class_keywords(cls: type) -> set[str] | None:
    """Keywords ``cls(params, ...)`` takes, following ``**kwargs`` up the base classes; None if open-ended."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        if klass is object:
            return None
        own, open_ended = _keywords(init, skip=2)  # self, params
        names |= own
        if not open_ended:
            return names
    return None


_REGISTRY: dict[str, OptimizerEntry] = {}


def register_optimizer(
    name: str, factory: Callable[..., torch.optim.Optimizer], description: str, *, requires: str | None = None,
    cuda_only: bool = False, takes_model: bool = False, target: str | None = None,
) -> None:
    """Add (or replace) a name in the registry (arguments: the fields of ``OptimizerEntry``)."""
    _REGISTRY[name] = OptimizerEntry(name, factory, description, requires, cuda_only, takes_model, target)


def list_optimizers(available_only: bool = False) -> list[str]:
    """Registered names, sorted; ``available_only`` drops those whose package is not installed."""
    return sorted(n for n, e in _REGISTRY.items() if not available_only or e.available())


def optimizer_entry(name: str) -> OptimizerEntry:
    """The entry for ``name``; ``ValueError`` listing the known names if there is none."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(list_optimizers())}")
    return _REGISTRY[name]


def _as_params(params_or_model) -> Iterable:
    if isinstance(params_or_model, torch.nn.Module):
        return [p for p in params_or_model.parameters() if p.requires_grad]
    return params_or_model


def create_optimizer(name: str, params_or_model, **kwargs) -> torch.optim.Optimizer:
    """Build the optimizer registered as ``name``.

    Args:
        name: a name from ``list_optimizers()``.
        params_or_model: an ``nn.Module`` (its trainable parameters are used), an iterable of
            parameters, or a list of param-group dicts.
        **kwargs: hyperparameters passed to the optimizer (``lr``, ``weight_decay``, ...); one it does not
            take raises ``UnknownOptionError`` before anything is built.
    """
    entry = optimizer_entry(name)
    if entry.cuda_only and not torch.cuda.is_available():  # first: installing the package would not help
        raise RuntimeError(f"optimizer {name!r} runs on CUDA only, and no CUDA device is available here")
    if not entry.available():
        raise ImportError(f"optimizer {name!r} needs the package {entry.requires!r}: pip install {entry.requires}")
    params = params_or_model if entry.takes_model else _as_params(params_or_model)
    if has_budget_options(kwargs):
        params, kwargs = _with_budget(entry, params_or_model, params, kwargs)
    if entry.requires is None:
        entry.check_keywords(kwargs)
        return entry.factory(params, **kwargs)
    with quiet(f"create_optimizer({name!r})"):  # importing the baseline's package is what prints the most
        entry.check_keywords(kwargs)
        return entry.factory(params, **kwargs)


def _with_budget(entry: OptimizerEntry, params_or_model, params, kwargs: dict) -> tuple[object, dict]:
    """``(params, kwargs)`` with the budget settings turned into ``policy=Budget(...)`` and, from a model, its
    parameters with their names; ``ValueError`` naming the problem (no budget for this optimizer, a policy
    given too, a bad value)."""
    if not entry.takes_budget:
        takers = ", ".join(n for n in list_optimizers() if _REGISTRY[n].takes_budget)
        raise UnknownOptionError(f"optimizer {entry.name!r} takes no memory budget (budget_bpp / budget_bytes): "
                                 f"only this library's optimizers choose their states' codecs: {takers}")  # fmt: skip
    entry.check_keywords(kwargs)  # a misspelt setting is named (with a suggestion) before the budget is read
    if kwargs.get("policy") is not None:
        raise ValueError(f"optimizer {entry.name!r}: give a memory budget or a policy, not both "
                         f"(the budget is a policy: {', '.join(k for k in BUDGET_KEYS if k in kwargs)})")  # fmt: skip
    try:
        rest, budget = split_budget(kwargs)
    except ValueError as exc:
        raise ValueError(f"optimizer {entry.name!r}: {exc}") from None
    named = _named(params_or_model) if isinstance(params_or_model, torch.nn.Module) else None
    return (named if named is not None else params), {**rest, "policy": budget}


# ------------------------------------------------------------------------------------ built-in entries


def _qadamw(bits: int):
    def make(params, **kw):
        from .optim.qadamw import QAdamW

        kw.setdefault("bits", bits)
        return QAdamW(params, **kw)

    return make


def _torch_adamw(params, **kw):
    kw.setdefault("weight_decay", 1e-2)
    return torch.optim.AdamW(params, **kw)


def _torch_adam(params, **kw):
    return torch.optim.Adam(params, **kw)


def _torch_sgd(params, lr: float = 1e-2, momentum: float = 0.9, **kw):
    return torch.optim.SGD(params, lr=lr, momentum=momentum, **kw)


def _ours(module: str, cls_name: str, **preset):
    def make(params, **kw):
        cls = getattr(importlib.import_module(f"efficient_optim.optim.{module}"), cls_name)
        for key, value in preset.items():
            kw.setdefault(key, value)
        return cls(params, **kw)

    return make


# 4-bit settings of the per-layer sensitivity study (effopt characterize): the naive baseline, with a zero-free v
# map, and the library's 4-bit defaults
NAIVE_4BIT = {"bits": 4, "m_map": "linear", "v_map": "linear", "m_block_size": 2048, "v_block_size": 2048,
              "rounding": "nearest"}  # fmt: skip
SENSITIVITY_PRESETS = {"naive": NAIVE_4BIT, "zerofree": {**NAIVE_4BIT, "v_map": "linear_nozero"}, "default4": {"bits": 4}}


def _partial(params, *, select: str = "none", preset: str = "zerofree", **kw):
    """QAdamW with the parameters at indices ``select`` (dot-separated, or ``none``) stored with the
    ``SENSITIVITY_PRESETS[preset]`` settings and every other parameter in fp32: a ``ByIndex`` policy."""
    from .optim.qadamw import QAdamW
    from .policy import ByIndex
    from .policy.specs import BITS_NAME

    if preset not in SENSITIVITY_PRESETS:
        raise ValueError(f"invalid preset: {preset!r} (choose one of {sorted(SENSITIVITY_PRESETS)})")
    params = list(params)
    chosen = set() if str(select) == "none" else {int(s) for s in str(select).split(".") if s != ""}
    if any(i >= len(params) for i in chosen):
        raise ValueError(f"select {select!r} names a parameter beyond the {len(params)} given")
    kw.setdefault("bits", 32)
    opt = QAdamW(params, **kw)
    settings = {**opt.param_groups[0], **SENSITIVITY_PRESETS[preset]}
    spec = BITS_NAME[settings["bits"]]
    low = {name: opt.resolve_spec(name, spec, None, settings) for name in ("exp_avg", "exp_avg_sq")}
    opt.policy = ByIndex(dict.fromkeys(chosen, low))  # before any state exists: every plan follows it
    return opt


def _adafactor(params, **kw):
    from .optim.adafactor import Adafactor

    if kw.get("lr") is not None:  # an explicit learning rate (the benchmark's schedule) replaces the relative step
        kw.setdefault("relative_step", False)
        kw.setdefault("scale_parameter", False)
    return Adafactor(params, **kw)


def _hf_adafactor(params, **kw):
    from transformers.optimization import Adafactor

    if kw.get("lr") is not None:
        kw.setdefault("relative_step", False)
        kw.setdefault("scale_parameter", False)
    return Adafactor(params, **kw)


def _projected_groups(params, rank: int, **group_settings) -> list[dict]:
    """GaLore/APOLLO param groups: matrices whose shorter side exceeds ``rank`` get the projection settings."""
    params = list(params)
    if params and isinstance(params[0], dict):
        raise ValueError("galore_adamw / apollo_adamw build their own param groups: pass a model or a list of parameters")
    low = [p for p in params if p.dim() == 2 and min(p.shape) > rank]
    rest = [p for p in params if not any(p is q for q in low)]
    groups = [{"params": low, "rank": rank, **group_settings}] if low else []
    return groups + ([{"params": rest}] if rest else [])


def _galore(params, rank: int = 128, update_proj_gap: int = 200, scale: float = 0.25, proj_type: str = "std", **kw):
    from galore_torch import GaLoreAdamW

    kw.setdefault("no_deprecation_warning", True)
    groups = _projected_groups(params, rank, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type)
    return GaLoreAdamW(groups, **kw)


def _apollo(params, rank: int = 256, update_proj_gap: int = 200, scale: float = 1.0, proj: str = "random",
            proj_type: str = "std", scale_type: str = "channel", **kw):  # fmt: skip
    from apollo_torch import APOLLOAdamW

    groups = _projected_groups(params, rank, update_proj_gap=update_proj_gap, scale=scale, proj=proj,
                               proj_type=proj_type, scale_type=scale_type)  # fmt: skip
    return APOLLOAdamW(groups, **kw)


def _named(params_or_model) -> list[tuple[str, torch.nn.Parameter]] | None:
    """``(name, parameter)`` pairs from a model or an iterable of such pairs; None for plain parameters."""
    if isinstance(params_or_model, torch.nn.Module):
        return [(n, p) for n, p in params_or_model.named_parameters() if p.requires_grad]
    items = list(params_or_model)
    if items and all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in items):
        return items
    return None


def _adam_mini(model, dim: int | None = None, n_heads: int | None = None, n_kv_heads: int | None = None, **kw):
    from adam_mini import Adam_mini

    named = _named(model)
    if named is None:
        raise ValueError("adam_mini needs parameter names (it groups parameters by name and attention head): "
                         "create_optimizer('adam_mini', model, ...) or pass model.named_parameters()")  # fmt: skip
    cfg = getattr(model, "config", None)
    dim = dim or getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    n_heads = n_heads or getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    n_kv_heads = n_kv_heads or getattr(cfg, "num_key_value_heads", None)
    if dim is None or n_heads is None:
        raise ValueError("adam_mini needs dim= and n_heads= (or a transformers model whose config has them)")
    kw.setdefault("verbose", False)
    return Adam_mini(named, dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads, **kw)


def _came(params, **kw):
    from came_pytorch import CAME

    kw.setdefault("lr", 2e-4)
    return CAME(params, **kw)


def _flash(params, **kw):
    from flashoptim import FlashAdamW

    return FlashAdamW(params, **kw)


def _bnb(cls_name: str):
    def make(params, **kw):
        import bitsandbytes as bnb

        return getattr(bnb.optim, cls_name)(params, **kw)

    return make


def _torchao(cls_name: str):
    def make(params, **kw):
        import torchao.optim as tao

        return getattr(tao, cls_name)(params, **kw)

    return make


_Q, _OPT = "efficient_optim.optim.qadamw:QAdamW", "efficient_optim.optim."
register_optimizer("adamw", _torch_adamw, "torch.optim.AdamW (fp32 states, 8 B/param)", target="torch.optim:AdamW")
register_optimizer("adam", _torch_adam, "torch.optim.Adam (fp32 states, 8 B/param)", target="torch.optim:Adam")
register_optimizer("sgd", _torch_sgd, "torch.optim.SGD with momentum 0.9 (4 B/param)", target="torch.optim:SGD")
register_optimizer("qadamw", _qadamw(8), "efficient_optim QAdamW, any bits=32|16|8|4 (default 8), all options", target=_Q)
register_optimizer("qadamw8", _qadamw(8), "efficient_optim QAdamW, 8-bit block-quantized moments (~2 B/param)", target=_Q)
register_optimizer("qadamw4", _qadamw(4), "efficient_optim QAdamW, 4-bit block-quantized moments (~1 B/param)", target=_Q)
register_optimizer("hybrid_adam", _ours("hybrid_adam", "HybridAdam"),
                   "efficient_optim HybridAdam: 4-bit m + factored v (~0.52 B/param on large matrices)",
                   target=_OPT + "hybrid_adam:HybridAdam")  # fmt: skip
register_optimizer("lion", _ours("lion", "Lion"), "efficient_optim Lion, fp32 momentum (4 B/param)", target=_OPT + "lion:Lion")
register_optimizer("lion8", _ours("lion", "Lion", m_bits=8), "efficient_optim Lion, 8-bit momentum (~1 B/param)",
                   target=_OPT + "lion:Lion")  # fmt: skip
register_optimizer("sgd8", _ours("sgd", "SGD", momentum_bits=8), "efficient_optim SGD, momentum 0.9 stored at 8 bits",
                   target=_OPT + "sgd:SGD")  # fmt: skip
register_optimizer("adafactor", _adafactor, "efficient_optim Adafactor (factored v, no first moment by default)",
                   target=_OPT + "adafactor:Adafactor")  # fmt: skip
register_optimizer("adafactor_hf", _hf_adafactor, "transformers' Adafactor", requires="transformers",
                   target="transformers.optimization:Adafactor")  # fmt: skip
register_optimizer("lion_bnb_8bit", _bnb("Lion8bit"), "bitsandbytes Lion8bit", requires="bitsandbytes",
                   target="bitsandbytes.optim:Lion8bit")  # fmt: skip
register_optimizer("adamw_bnb_8bit", _bnb("AdamW8bit"), "bitsandbytes AdamW8bit", requires="bitsandbytes",
                   target="bitsandbytes.optim:AdamW8bit")  # fmt: skip
register_optimizer("galore_adamw", _galore, "GaLore AdamW (galore-torch): gradient projected to rank 128, refreshed every 200 steps",
                   requires="galore-torch", target="galore_torch:GaLoreAdamW")
register_optimizer("apollo_adamw", _apollo, "APOLLO AdamW (apollo-torch): random projection rank 256, channel-wise scaling",
                   requires="apollo-torch", target="apollo_torch:APOLLOAdamW")
register_optimizer("adam_mini", _adam_mini, "Adam-mini (adam-mini): one second-moment value per block/head",
                   requires="adam-mini", takes_model=True, target="adam_mini:Adam_mini")
register_optimizer("came", _came, "CAME (came-pytorch): confidence-guided factored moments", requires="came-pytorch",
                   target="came_pytorch:CAME")  # fmt: skip
register_optimizer("flash_adamw", _flash, "FlashOptim FlashAdamW (CUDA/Triton only)", requires="flashoptim", cuda_only=True,
                   target="flashoptim:FlashAdamW")  # fmt: skip
register_optimizer("adamw_torchao_8bit", _torchao("AdamW8bit"), "torchao AdamW8bit", requires="torchao",
                   target="torchao.optim:AdamW8bit")  # fmt: skip
register_optimizer("adamw_torchao_4bit", _torchao("AdamW4bit"), "torchao AdamW4bit", requires="torchao",
                   target="torchao.optim:AdamW4bit")  # fmt: skip
register_optimizer("galore", _ours("galore_adamw", "GaLoreAdamW"),
                   "efficient_optim GaLoreAdamW: Adam in a rank-16 gradient subspace refreshed every 50 steps (no package needed)",
                   target=_OPT + "galore_adamw:GaLoreAdamW")  # fmt: skip
register_optimizer("qadamw_partial", _partial,
                   "QAdamW with chosen parameters (by index) at 4-bit presets, the rest fp32 (effopt characterize)")  # fmt: skip
register_optimizer("lowrank_adam", _ours("lowrank_adam", "LowRankAdam"),
                   "efficient_optim LowRankAdam (P7): rank-16 first moment (randomized SVD every 10 steps), factored v on matrices",
                   target=_OPT + "lowrank_adam:LowRankAdam")  # fmt: skip
