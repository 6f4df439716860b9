"""The configurations of the error decomposition (``analysis.decomposition``): the user's HybridAdam options,
which source of error each moment's codec is (quantization or factoring, from the codec's own
``error_kind``), and the four shadows' options (dense, quant alone, factor alone, both)."""

from __future__ import annotations

import torch

from ..optim.hybrid_adam import M_CODECS, V_CODECS, HybridAdam
from ..state import Dense, Factored, Quantized, StateCodec
from ..state.codec import ERROR_KINDS
from ..state.lowrank import LowRank

DEFAULT_SPEC = "hybrid_adam"
VARIANTS = ("dense", "quant", "factor", "both")
# HybridAdam's codec names, each as a codec of that kind (what it is stored as decides its source of error)
NAMED_CODECS: dict[str, StateCodec] = {"fp32": Dense(), "bf16": Dense(torch.bfloat16), "8bit": Quantized(8),
                                       "4bit": Quantized(4), "factored": Factored(), "lowrank": LowRank()}  # fmt: skip
SOURCE_OF_ERROR_KIND = {"none": "dense", "quantization": "quant", "factorization": "factor", "lowrank": "factor"}
_ROUNDED_NAMES = ("bf16", "8bit", "4bit")  # the names whose codecs take a rounding mode


def parse_hybrid_config(config: str | dict | None) -> dict:
    """HybridAdam keyword arguments from a spec, a dict, or None (the HybridAdam defaults).

    A spec is ``hybrid_adam[+key=value...]`` (as in ``effopt bench``), or just the settings
    (``m_codec=8bit+v_codec=lowrank``). ``beta1`` / ``beta2`` set ``betas``. ``ValueError`` for another
    optimizer name, a malformed setting, or an option HybridAdam does not accept or rejects.
    """
    from ..optimizer_specs import parse_spec

    if config is None:
        kwargs: dict = {}
    elif isinstance(config, dict):
        kwargs = dict(config)
    elif isinstance(config, str):
        spec = config.strip()
        if not spec:
            kwargs = {}
        else:
            head = spec.split("+", 1)[0]
            if "=" in head:
                spec = f"{DEFAULT_SPEC}+{spec}"
            name, kwargs = parse_spec(spec)
            if name != DEFAULT_SPEC:
                raise ValueError(
                    f"unknown spec {config!r}: effopt decompose takes a {DEFAULT_SPEC} configuration, "
                    f"e.g. hybrid_adam+m_codec=4bit+v_codec=factored (m_codec: {', '.join(M_CODECS)}; "
                    f"v_codec: {', '.join(V_CODECS)})"
                )
    else:
        raise ValueError(
            f"config must be a spec string, a dict of HybridAdam options or None, got {config!r}"
        )
    if "beta1" in kwargs or "beta2" in kwargs:
        b1, b2 = kwargs.get("betas", (0.9, 0.999))
        kwargs["betas"] = (kwargs.pop("beta1", b1), kwargs.pop("beta2", b2))
    probe = {k: v for k, v in kwargs.items() if k not in ("lr", "weight_decay")}
    try:  # every option checked now, on a tensor large enough to be compressed
        HybridAdam([torch.zeros(64, 64)], **probe)
    except TypeError as exc:
        raise ValueError(f"invalid HybridAdam option in {config!r}: {exc}") from None
    for prefix in ("m", "v"):
        codec_kind(kwargs.get(f"{prefix}_codec", "4bit" if prefix == "m" else "factored"))
    return kwargs


def codec_kind(choice) -> str:
    """``"dense"``, ``"quant"`` or ``"factor"``: which source of error a moment's codec choice is.

    ``choice`` is a HybridAdam ``m_codec`` / ``v_codec`` value: a name (``fp32``; ``bf16``, ``8bit``, ``4bit``;
    ``factored``, ``lowrank``) or any ``StateCodec``, judged by its ``error_kind``: ``"none"`` is dense,
    ``"quantization"`` quant, ``"factorization"`` and ``"lowrank"`` factor (wrappers such as error feedback say
    what they wrap). ``ValueError`` for an unknown name, a codec with another error kind, or anything else.
    """
    if isinstance(choice, str):
        if choice not in NAMED_CODECS:
            raise ValueError(f"unknown codec {choice!r} (choose one of {', '.join(NAMED_CODECS)})")
        choice = NAMED_CODECS[choice]
    if not isinstance(choice, StateCodec):
        raise ValueError(f"invalid codec {choice!r}: a name or a StateCodec")
    kind = choice.error_kind
    if kind not in SOURCE_OF_ERROR_KIND:
        raise ValueError(f"codec {choice!r} says its error_kind is {kind!r}; it must be one of {ERROR_KINDS}")
    return SOURCE_OF_ERROR_KIND[kind]


def variant_configs(kwargs: dict) -> dict[str, dict]:
    """The four shadows' HybridAdam options from the user's: dense, quant alone, factor alone, both.

    "Alone" keeps the user's codec for the moments of that kind and puts fp32 in the others; every other
    option is kept, except those that only the replaced codecs use (HybridAdam refuses an option with no
    effect): ``{m,v}_map`` / ``_block_size`` / ``_rounding`` of a moment set to fp32, ``rank`` without a
    ``"lowrank"`` moment, ``rounding`` without a rounded (``bf16``, ``8bit``, ``4bit``) one. ``lr`` /
    ``weight_decay`` are dropped (the shadows use 1 and 0).
    """
    base = {k: v for k, v in kwargs.items() if k not in ("lr", "weight_decay")}
    chosen = {"m": base.get("m_codec", "4bit"), "v": base.get("v_codec", "factored")}
    out = {}
    for variant in VARIANTS:
        cfg = dict(base)
        for prefix, choice in chosen.items():
            keep = variant == "both" or codec_kind(choice) == variant
            cfg[f"{prefix}_codec"] = choice if keep else "fp32"
            if not keep:
                for option in ("map", "block_size", "rounding"):
                    cfg.pop(f"{prefix}_{option}", None)
        codecs = (cfg["m_codec"], cfg["v_codec"])
        if "lowrank" not in codecs:
            cfg.pop("rank", None)
        if not any(c in _ROUNDED_NAMES for c in codecs):
            cfg.pop("rounding", None)
        out[variant] = cfg
    return out


def describe_codec(codec: StateCodec, param: torch.Tensor) -> str:
    """A short name of the codec a moment of ``param`` really uses (after the small-tensor rules): the codec's
    own ``describe(param)``, e.g. ``"4bit"``, ``"factored"``, ``"lowrank(r=8)"``, ``"4bit (ErrorCorrected)"``."""
    return codec.describe(param)


def is_exact(codec: StateCodec, param: torch.Tensor) -> bool:
    """Whether ``codec`` stores the state of ``param`` without error (its ``error_kind_for(param)`` is "none")."""
    return codec.error_kind_for(param) == "none"
