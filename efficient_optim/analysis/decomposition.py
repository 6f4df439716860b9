"""Protocol P3: where the error of a hybrid optimizer's update comes from (quantization, factoring, both).

    from efficient_optim.analysis.decomposition import decompose_errors, write_outputs
    result = decompose_errors(RunConfig(), "hybrid_adam+m_codec=4bit+v_codec=factored", steps=300, every=10)
    write_outputs(result, "runs/p3")        # decomposition.json, decomposition.png, decomposition.md

or ``effopt decompose --out runs/p3``.

**Method.** One model is trained along a *trajectory* (default: exact fp32 AdamW). At every step the same
(clipped) gradient is also given to four *shadow* optimizers, ``HybridAdam`` instances that each own
their states and differ only in the moments' codecs:

- ``dense``: m and v fp32 (torch AdamW's arithmetic): the reference direction ``d``;
- ``quant``: the user's quantized moments (``8bit``, ``4bit``, ``bf16`` or a ``Quantized`` codec), every
  factored / low-rank moment replaced by fp32;
- ``factor``: the user's factored / low-rank moments, every quantized one replaced by fp32;
- ``both``: the user's configuration as given.

Every other option (maps, block sizes, rounding, seed, error correction, rank, ...) is the user's in all four,
so any combination works (m low-rank and v 4-bit is as valid as the default m 4-bit and v factored). A
shadow steps with ``lr=1`` and no weight decay on a parameter set to zero, so what the parameter holds
after the step is exactly ``-m_hat / (sqrt(v_hat) + eps)``, the update direction, with no cancellation
against the parameter's value. The trajectory applies ``p <- p (1 - lr_t wd) - lr_t d_traj`` itself
(decoupled weight decay, the harness's warm-up + cosine schedule), which is AdamW exactly when
``d_traj`` is the dense shadow's direction (``trajectory="adamw"``) and HybridAdam exactly when it is the
``both`` shadow's (``trajectory="hybrid"``: the errors along the hybrid's own path). Each shadow's state
therefore accumulates its own compression error over time, as in a real run, while all four see the
same gradients at the same parameters: the differences are the storage formats and nothing else.

**Measures**, per measured step and per parameter (layer), for ``x`` in quant / factor / both:
``err_x = ||d_x - d|| / ||d||`` and ``cos_x = cos(d_x, d)``. Writing the errors as vectors
``delta_x = d_x - d``, ``delta_both = delta_quant + delta_factor + coupling``: the relative norm of the
``coupling`` vector and ``err_cos = cos(delta_quant, delta_factor)`` are recorded too (0 means the two
errors point in unrelated directions). Three models of how the scalar errors combine are compared with
the measured ``err_both``:

- ``linear``: ``e_q + e_f`` (aligned errors; the triangle inequality's upper bound without coupling);
- ``independent``: ``sqrt(e_q^2 + e_f^2)`` (uncorrelated errors add in quadrature);
- ``multiplicative``: ``(1 + e_q)(1 + e_f) - 1`` (per element ``m (1 + a) / sqrt(v (1 + b))``: the
  relative errors compound).

On layers where both sources are active (``err_quant`` and ``err_factor`` above ``1e-6``), each model's
misfit is the mean ``|log(err_both / prediction)|`` over steps and layers; the smallest wins. The verdict
is one of ``VERDICTS``: ``none`` (no error at all), ``single_source`` (no layer has both sources active),
``subadditive`` (the median ``err_both`` is over 10 % below even the independent prediction: the errors
partly cancel), ``supermultiplicative`` (over 10 % above the multiplicative one: strong coupling), or the
best-fitting model ``independent`` / ``additive`` / ``multiplicative``. The interaction term
``err_both - (e_q + e_f)`` (negative: less than additive) is reported beside it. When the errors are
small, ``e_q e_f`` (the gap between the linear and multiplicative predictions) is small too, and the
verdict text says when the two are hard to tell apart.

Aggregates over layers are numel-weighted means over the *compressed* layers (those whose ``both``
codecs are not exact fp32; small and 1-D tensors keep fp32 moments and have no error; every layer when none
is compressed), and over time plain means over the measured steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..optim.hybrid_adam import M_CODECS, V_CODECS, HybridAdam
from ..state import Dense, Factored, Quantized, StateCodec

DEFAULT_SPEC = "hybrid_adam"
DEFAULT_STEPS = 300
DEFAULT_EVERY = 10
VARIANTS = ("dense", "quant", "factor", "both")
SOURCES = ("quant", "factor", "both")
MODELS = ("linear", "independent", "multiplicative")
VERDICTS = (
    "none",
    "single_source",
    "subadditive",
    "independent",
    "additive",
    "multiplicative",
    "supermultiplicative",
)
TRAJECTORIES = ("adamw", "hybrid")
ACTIVE_TOL = 1e-6  # a source's error below this on a layer: the source is not active there
_MODEL_VERDICT = {"linear": "additive", "independent": "independent", "multiplicative": "multiplicative"}
_QUANT_CHOICES = ("bf16", "8bit", "4bit")
_FACTOR_CHOICES = ("factored", "lowrank")


# --------------------------------------------------------------------------------- configurations
def parse_hybrid_config(config: str | dict | None) -> dict:
    """HybridAdam keyword arguments from a spec, a dict, or None (the HybridAdam defaults).

    A spec is ``hybrid_adam[+key=value...]`` (as in ``effopt bench``), or just the settings
    (``m_codec=8bit+v_codec=lowrank``). ``beta1`` / ``beta2`` set ``betas``. ``ValueError`` for another
    optimizer name, a malformed setting, or an option HybridAdam does not accept or rejects.
    """
    from ..bench.config import parse_spec

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
    """``"dense"``, ``"quant"`` or ``"factor"``: what kind of error a moment's codec choice introduces.

    ``choice`` is a HybridAdam ``m_codec`` / ``v_codec`` value: a name (``fp32`` dense; ``bf16``, ``8bit``,
    ``4bit`` quantization; ``factored``, ``lowrank`` factoring) or a ``StateCodec`` (wrappers such as error
    feedback are judged by the codec they wrap). ``ValueError`` for anything else.
    """
    if isinstance(choice, str):
        if choice == "fp32":
            return "dense"
        if choice in _QUANT_CHOICES:
            return "quant"
        if choice in _FACTOR_CHOICES:
            return "factor"
        raise ValueError(
            f"unknown codec {choice!r} (choose one of fp32, {', '.join(_QUANT_CHOICES + _FACTOR_CHOICES)})"
        )
    if isinstance(choice, StateCodec):
        inner = _unwrap(choice)
        if isinstance(inner, Dense):
            return "dense" if inner.is_dense_fp32 else "quant"
        if isinstance(inner, Factored) or type(inner).__name__ == "LowRank":
            return "factor"
        if isinstance(inner, Quantized) or type(inner).__name__ == "LearnedQuantized":
            return "quant"
        raise ValueError(
            f"cannot tell whether codec {choice!r} quantizes or factors; pass a name or a known codec"
        )
    raise ValueError(f"invalid codec {choice!r}: a name or a StateCodec")


def _unwrap(codec: StateCodec) -> StateCodec:
    while isinstance(getattr(codec, "inner", None), StateCodec):
        codec = codec.inner
    return codec


def variant_configs(kwargs: dict) -> dict[str, dict]:
    """The four shadows' HybridAdam options from the user's: dense, quant alone, factor alone, both.

    "Alone" keeps the user's codec for the moments of that kind and puts fp32 in the others; every other
    option is kept. ``lr`` / ``weight_decay`` are dropped (the shadows use 1 and 0).
    """
    base = {k: v for k, v in kwargs.items() if k not in ("lr", "weight_decay")}
    chosen = {"m": base.get("m_codec", "4bit"), "v": base.get("v_codec", "factored")}
    out = {}
    for variant in VARIANTS:
        cfg = dict(base)
        for prefix, choice in chosen.items():
            keep = variant == "both" or codec_kind(choice) == variant
            cfg[f"{prefix}_codec"] = choice if keep else "fp32"
        out[variant] = cfg
    return out


def describe_codec(codec: StateCodec, param: torch.Tensor) -> str:
    """A short name of the codec a moment of ``param`` really uses (after the small-tensor rules)."""
    inner = _unwrap(codec)
    wrapped = "" if inner is codec else f" ({type(codec).__name__})"
    if isinstance(inner, Dense):
        return (
            str(inner.dtype).replace("torch.", "").replace("float32", "fp32").replace("bfloat16", "bf16")
            + wrapped
        )
    if isinstance(inner, Quantized):
        return f"{inner.bits}bit" + wrapped
    if isinstance(inner, Factored):
        return "factored" + wrapped
    if type(inner).__name__ == "LowRank":
        return (f"lowrank(r={inner.rank})" if inner.is_lowrank(param) else "fp32") + wrapped
    if type(inner).__name__ == "LearnedQuantized":
        return f"{inner.bits}bit-learned" + wrapped
    return type(inner).__name__ + wrapped


def _exact(codec: StateCodec, param: torch.Tensor) -> bool:
    inner = _unwrap(codec)
    if type(inner).__name__ == "LowRank":
        return not inner.is_lowrank(param)
    return codec.is_dense_fp32


# ------------------------------------------------------------------------------------- shadows
class _Shadow:
    """A HybridAdam over zero-valued fp32 copies of the parameters: its step returns the update direction."""

    def __init__(self, shapes: list[torch.Size], device, kwargs: dict):
        self.params = [torch.zeros(s, dtype=torch.float32, device=device) for s in shapes]
        self.opt = HybridAdam(self.params, lr=1.0, weight_decay=0.0, **kwargs)

    def direction(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """``m_hat / (sqrt(v_hat) + eps)`` of each parameter after one step with ``grads``."""
        for p, g in zip(self.params, grads):
            p.zero_()
            p.grad = g.clone()
        self.opt.step()
        out = [-p.detach().clone() for p in self.params]
        for p in self.params:
            p.grad = None
        return out

    def codecs(self, index: int) -> dict:
        return self.opt.describe_codecs(self.params[index])


# ------------------------------------------------------------------------------------- measures
def _layer_record(d: dict[str, torch.Tensor]) -> dict:
    ref = d["dense"].double()
    nref = float(ref.norm())
    if nref == 0.0 or not math.isfinite(nref):
        empty = [f"{k}_{x}" for x in SOURCES for k in ("err", "cos")] + ["coupling", "err_cos"]
        return dict.fromkeys(empty)
    rec: dict = {}
    deltas = {}
    for x in SOURCES:
        dx = d[x].double()
        deltas[x] = dx - ref
        rec[f"err_{x}"] = float(deltas[x].norm()) / nref
        ndx = float(dx.norm())
        rec[f"cos_{x}"] = float(torch.dot(dx.flatten(), ref.flatten())) / (ndx * nref) if ndx > 0 else 0.0
    rec["coupling"] = float((deltas["both"] - deltas["quant"] - deltas["factor"]).norm()) / nref
    nq, nf = float(deltas["quant"].norm()), float(deltas["factor"].norm())
    rec["err_cos"] = (
        float(torch.dot(deltas["quant"].flatten(), deltas["factor"].flatten())) / (nq * nf)
        if nq > 0 and nf > 0
        else None
    )
    rec["_sq"] = {x: float(deltas[x].norm()) ** 2 for x in SOURCES} | {"ref": nref**2}
    return rec


def predictions(e_q: float, e_f: float) -> dict[str, float]:
    """The combined error each model predicts from the two errors alone."""
    return {
        "linear": e_q + e_f,
        "independent": math.hypot(e_q, e_f),
        "multiplicative": (1 + e_q) * (1 + e_f) - 1,
    }


def _weighted(pairs: list[tuple[float, float]]) -> float | None:
    pairs = [(v, w) for v, w in pairs if v is not None and math.isfinite(v)]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total > 0 else None


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def classify(points: list[tuple[float, float, float]]) -> dict:
    """Which model fits ``(e_q, e_f, e_both)`` points best, and the verdict (one of ``VERDICTS``).

    Only points where both sources are active (``e_q``, ``e_f`` > ``ACTIVE_TOL``) are fitted. Returns
    ``fit`` (per model: ``mean_abs_log_ratio`` and ``median_ratio`` = median of measured / predicted),
    ``best_model``, ``verdict``, ``points`` (how many were fitted) and ``distinguishable`` (whether the
    linear and multiplicative predictions differ by more than 5 % on the median point).
    """
    pts = [
        (q, f, b)
        for q, f, b in points
        if q > ACTIVE_TOL and f > ACTIVE_TOL and b is not None and math.isfinite(b)
    ]
    if not pts:
        any_error = any(
            (q or 0) > ACTIVE_TOL or (f or 0) > ACTIVE_TOL or (b or 0) > ACTIVE_TOL for q, f, b in points
        )
        return {"fit": {}, "best_model": None, "verdict": "single_source" if any_error else "none", "points": 0,
                "distinguishable": None}  # fmt: skip
    fit = {}
    for model in MODELS:
        ratios = [max(b, 1e-30) / predictions(q, f)[model] for q, f, b in pts]
        fit[model] = {"mean_abs_log_ratio": sum(abs(math.log(r)) for r in ratios) / len(ratios),
                      "median_ratio": statistics.median(ratios)}  # fmt: skip
    best = min(MODELS, key=lambda m: fit[m]["mean_abs_log_ratio"])
    if fit["independent"]["median_ratio"] < 0.9:
        verdict = "subadditive"
    elif fit["multiplicative"]["median_ratio"] > 1.1:
        verdict = "supermultiplicative"
    else:
        verdict = _MODEL_VERDICT[best]
    gaps = [predictions(q, f)["multiplicative"] / predictions(q, f)["linear"] - 1 for q, f, _ in pts]
    return {"fit": fit, "best_model": best, "verdict": verdict, "points": len(pts),
            "distinguishable": statistics.median(gaps) > 0.05}  # fmt: skip


def verdict_text(summary: dict) -> str:
    """The verdict as a plain sentence with the numbers behind it."""
    v = summary["verdict"]
    if v == "none":
        return "No error: every compressed variant gives the dense AdamW direction (this configuration stores both moments exactly)."
    e = {x: summary.get(f"mean_err_{x}") or 0.0 for x in SOURCES}
    if v == "single_source":
        src = "quantization" if e["quant"] >= e["factor"] else "factoring/low rank"
        return (f"Only one source of error is active ({src}): mean relative error {e['both']:.4f}; no layer has both "
                "a quantized and a factored/low-rank moment, so there is nothing to decompose.")  # fmt: skip
    fit = summary["fit"]
    words = {
        "independent": "The errors add in quadrature, as independent errors do: err_both ~ sqrt(e_q^2 + e_f^2).",
        "additive": "The errors add linearly: err_both ~ e_q + e_f.",
        "multiplicative": "The errors multiply: err_both ~ (1 + e_q)(1 + e_f) - 1.",
        "subadditive": "The errors partly cancel: err_both is below even the independent (quadrature) sum.",
        "supermultiplicative": "The errors couple strongly: err_both exceeds even the multiplicative prediction.",
    }
    parts = [words[v],
             f"Mean relative error of the update direction: quantization alone {e['quant']:.4f}, factoring alone "
             f"{e['factor']:.4f}, both {e['both']:.4f}.",
             "Measured / predicted (median over steps and layers): " + ", ".join(
                 f"{m} {fit[m]['median_ratio']:.3f} (misfit {fit[m]['mean_abs_log_ratio']:.3f})" for m in MODELS) + ".",
             f"Interaction err_both - (e_q + e_f) = {summary['mean_interaction']:+.4f}; coupling vector "
             f"{summary['mean_coupling']:.4f}; cos(delta_q, delta_f) = {_fmt(summary['mean_err_cos'])}."]  # fmt: skip
    if summary.get("distinguishable") is False:
        parts.append("At these error sizes the linear and multiplicative predictions differ by under 5 %, so those "
                     "two models are hard to tell apart; the independent-vs-additive distinction is the robust one.")  # fmt: skip
    return " ".join(parts)


def _fmt(x, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


# ---------------------------------------------------------------------------------------- driver
@dataclasses.dataclass
class _Setup:
    model: torch.nn.Module
    loss_of: Callable[[int], torch.Tensor]  # step -> loss, backward done
    lr_at: Callable[[int], float]  # step (1-based) -> learning rate
    lr_peak: float
    weight_decay: float
    clip: float
    seed: int | None  # the run's seed (stochastic rounding follows it unless the spec sets one)
    info: dict


def _setup(task, steps: int, loss_fn, lr, weight_decay, clip, spec_kwargs: dict) -> _Setup:
    from ..bench.config import RunConfig

    if task is None:
        task = RunConfig()
    if isinstance(task, RunConfig) or hasattr(task, "build_model"):
        from ..bench.tasks import build_task
        from ..bench.train import lr_factor, resolve_device

        if isinstance(task, RunConfig):
            cfg = dataclasses.replace(task, steps=steps)
            cfg.validate()
            device = resolve_device(cfg.device)
            task = build_task(cfg, device)
        else:
            cfg = dataclasses.replace(task.cfg, steps=steps)
            device = task.device
        model = task.build_model().to(device=device, dtype=getattr(torch, cfg.param_dtype))
        gen = torch.Generator().manual_seed(cfg.seed)
        autocast = (
            (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
            if device.type == "cuda"
            else contextlib.nullcontext
        )

        def loss_of(step: int) -> torch.Tensor:
            total = 0.0
            for _ in range(cfg.grad_accum):
                with autocast():
                    loss = task.loss(model, task.train_batch(gen)) / cfg.grad_accum
                loss.backward()
                total += float(loss.detach())
            return torch.tensor(total)

        peak = lr if lr is not None else spec_kwargs.get("lr", cfg.lr)
        wd = weight_decay if weight_decay is not None else spec_kwargs.get("weight_decay", cfg.weight_decay)
        info = {"model": cfg.model, "layers": cfg.layers, "width": cfg.width, "data": cfg.data, "seed": cfg.seed,
                "batch_size": cfg.batch_size, "context": getattr(task, "context", cfg.context), "device": str(device),
                "lr_schedule": "warm-up + cosine (bench.train.lr_factor)"}  # fmt: skip
        return _Setup(model, loss_of, lambda s: peak * lr_factor(s - 1, cfg), peak, wd,
                      clip if clip is not None else cfg.clip, cfg.seed, info)  # fmt: skip
    if isinstance(task, torch.nn.Module):
        if loss_fn is None:
            raise ValueError("a model needs loss_fn(model, step) -> scalar loss tensor")
        model = task
        peak = lr if lr is not None else spec_kwargs.get("lr", 1e-3)
        wd = weight_decay if weight_decay is not None else spec_kwargs.get("weight_decay", 0.0)

        def loss_of(step: int) -> torch.Tensor:
            loss = loss_fn(model, step)
            loss.backward()
            return loss.detach()

        return _Setup(model, loss_of, lambda s: peak, peak, wd, clip if clip is not None else 0.0, None,
                      {"model": type(model).__name__, "lr_schedule": "constant"})  # fmt: skip
    raise ValueError(
        f"task must be a RunConfig, a benchmark task or a torch.nn.Module, got {type(task).__name__}"
    )


def decompose_errors(
    task=None,
    config: str | dict | None = None,
    steps: int = DEFAULT_STEPS,
    every: int = DEFAULT_EVERY,
    *,
    loss_fn: Callable | None = None,
    trajectory: str = "adamw",
    lr: float | None = None,
    weight_decay: float | None = None,
    clip: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Decompose the update-direction error of a HybridAdam configuration into quantization, factoring, both.

    Args:
        task: what to train: a ``bench.config.RunConfig`` (default ``None``: ``RunConfig()``, the harness's
            gpt2-tiny on the embedded corpus; its ``steps`` is replaced by ``steps``), a benchmark task
            (``bench.tasks.build_task(...)``), or a ``torch.nn.Module`` with ``loss_fn`` (trained in place).
        config: the hybrid configuration: a spec ``hybrid_adam[+key=value...]`` or bare settings
            ``m_codec=8bit+v_codec=lowrank``, a dict of ``HybridAdam`` keyword arguments, or ``None``
            (default: HybridAdam's defaults, 4-bit m and factored v). ``lr`` / ``weight_decay`` in it set
            the trajectory's; ``beta1`` / ``beta2`` set ``betas``.
        steps: training steps (default 300); must be >= 1.
        every: measure every this many steps (default 10); the last step is always measured. (Step 1 is
            error-free by construction: the rule uses the step's exact moments, compression only touches
            what is stored for the next step.)
        loss_fn: for a module: ``loss_fn(model, step) -> scalar loss`` (step counts from 1).
        trajectory: whose direction moves the model: ``"adamw"`` (default: the dense fp32 shadow, so the
            run is exact AdamW) or ``"hybrid"`` (the ``both`` shadow: the run is the HybridAdam run).
        lr: peak learning rate of the trajectory (default: the spec's ``lr``, else the run config's, else
            1e-3 for a module). The schedule is the harness's warm-up + cosine (constant for a module).
        weight_decay: decoupled weight decay of the trajectory (default: the spec's, else the run
            config's, else 0 for a module). The shadows' directions never include it.
        clip: gradient-norm clipping before the gradient reaches the shadows (default: the run config's,
            0 = off for a module).
        progress: called as ``progress(step, steps)`` after every step (e.g. a progress printer).

    Returns:
        A dict (JSON-ready): ``settings``, ``variants`` (each shadow's options), ``layers`` (per
        parameter: name, shape, numel, the codecs each variant uses, whether it is compressed),
        ``records`` (per measured step and layer: ``err_*`` / ``cos_*`` for quant, factor, both,
        ``coupling``, ``err_cos``, the three ``pred_*``), ``steps`` (per measured step: the train loss and
        the numel-weighted errors, cosines and predictions over compressed layers, plus ``global_err_*``:
        norm of all layers' error vectors together over the norm of the whole direction), ``per_layer``
        (time means per layer) and ``summary`` (means over time, ``fit``, ``best_model``, ``verdict``,
        ``verdict_text``).

    Raises:
        ValueError: unknown spec or option, ``steps`` / ``every`` < 1, unknown ``trajectory``, a module
            without ``loss_fn``.
    """
    for key, value in (("steps", steps), ("every", every)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
    if trajectory not in TRAJECTORIES:
        raise ValueError(f"trajectory must be one of {TRAJECTORIES}, got {trajectory!r}")
    for key, value in (("lr", lr), ("weight_decay", weight_decay), ("clip", clip)):
        if value is not None and not (
            isinstance(value, (int, float)) and math.isfinite(value) and value >= 0
        ):
            raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")
    kwargs = parse_hybrid_config(config)
    variants = variant_configs(kwargs)
    setup = _setup(task, steps, loss_fn, lr, weight_decay, clip, kwargs)
    # stochastic rounding follows the run's seed, as in the harness, unless the spec sets one
    if setup.seed is not None:
        for cfg in variants.values():
            cfg.setdefault("seed", setup.seed)
    model = setup.model
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    device = named[0][1].device
    shadows = {v: _Shadow([p.shape for _, p in named], device, variants[v]) for v in VARIANTS}
    params = [p for _, p in named]

    layers = []
    for i, (name, p) in enumerate(named):
        codecs = {v: shadows[v].codecs(i) for v in VARIANTS}
        desc = {
            v: {"m": describe_codec(c["exp_avg"], p), "v": describe_codec(c["exp_avg_sq"], p)}
            for v, c in codecs.items()
        }
        exact = {v: all(_exact(c, p) for c in codecs[v].values()) for v in VARIANTS}
        layers.append({"name": name, "shape": list(p.shape), "numel": p.numel(), "codecs": desc,
                       "compressed": not exact["both"], "quant_active": not exact["quant"],
                       "factor_active": not exact["factor"]})  # fmt: skip

    if not any(layer["compressed"] for layer in layers):  # a dense configuration: aggregate over every layer
        for layer in layers:
            layer["aggregated"] = True
    else:
        for layer in layers:
            layer["aggregated"] = layer["compressed"]
    records, step_rows = [], []
    skipped = 0
    t0 = time.perf_counter()
    d_traj_key = "dense" if trajectory == "adamw" else "both"
    for step in range(1, steps + 1):
        model.zero_grad(set_to_none=True)
        loss = float(setup.loss_of(step))
        if setup.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, setup.clip)
        grads = [
            torch.zeros_like(p, dtype=torch.float32) if p.grad is None else p.grad.detach().to(torch.float32)
            for p in params
        ]
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            skipped += 1  # no shadow and no parameter changes, as the library's optimizers do
            if progress:
                progress(step, steps)
            continue
        d = {v: shadows[v].direction(grads) for v in VARIANTS}
        if step % every == 0 or step == steps:
            step_rows.append(_measure(step, loss, d, layers, records))
        lr_t = setup.lr_at(step)
        with torch.no_grad():
            for p, dir_ in zip(params, d[d_traj_key]):
                p32 = p.detach().to(torch.float32)
                p32.mul_(1 - lr_t * setup.weight_decay).add_(dir_, alpha=-lr_t)
                p.copy_(p32)
        if progress:
            progress(step, steps)
    model.zero_grad(set_to_none=True)
    per_layer = _per_layer(layers, records)
    summary = _summary(step_rows, records, layers)
    summary["skipped_steps"] = skipped
    summary["verdict_text"] = verdict_text(summary)
    settings = {"spec": config if isinstance(config, str) or config is None else repr(config), "steps": steps,
                "every": every, "trajectory": trajectory, "lr_peak": setup.lr_peak, "weight_decay": setup.weight_decay,
                "clip": setup.clip, "seconds": round(time.perf_counter() - t0, 2), **setup.info}  # fmt: skip
    return {"settings": settings, "variants": {v: {k: _plain(x) for k, x in c.items()} for v, c in variants.items()},
            "layers": layers, "records": records, "steps": step_rows, "per_layer": per_layer, "summary": summary}  # fmt: skip


def _plain(x):
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, (tuple, list)):
        return [_plain(v) for v in x]
    return repr(x)


def _measure(step: int, loss: float, d: dict, layers: list[dict], records: list[dict]) -> dict:
    rows = []
    sq = {x: 0.0 for x in SOURCES} | {"ref": 0.0}
    for i, layer in enumerate(layers):
        rec = _layer_record({v: d[v][i] for v in VARIANTS})
        parts = rec.pop("_sq", None)
        if rec["err_both"] is not None:
            preds = predictions(rec["err_quant"], rec["err_factor"])
            rec.update({f"pred_{m}": preds[m] for m in MODELS})
            rec["interaction"] = rec["err_both"] - preds["linear"]
        else:
            rec.update({f"pred_{m}": None for m in MODELS} | {"interaction": None})
        records.append({"step": step, "layer": layer["name"], **rec})
        if layer["aggregated"]:
            rows.append((rec, layer["numel"]))
            if parts:
                for k in sq:
                    sq[k] += parts[k]
    row: dict = {"step": step, "loss": loss}
    keys = [f"{k}_{x}" for k in ("err", "cos") for x in SOURCES] + [f"pred_{m}" for m in MODELS]
    for key in [*keys, "coupling", "interaction"]:
        row[key] = _weighted([(r[key], w) for r, w in rows])
    for x in SOURCES:
        row[f"global_err_{x}"] = math.sqrt(sq[x] / sq["ref"]) if sq["ref"] > 0 else None
    return row


def _per_layer(layers: list[dict], records: list[dict]) -> dict:
    out = {}
    for layer in layers:
        mine = [r for r in records if r["layer"] == layer["name"]]
        entry = {"numel": layer["numel"], "compressed": layer["compressed"], "aggregated": layer["aggregated"],
                 "m": layer["codecs"]["both"]["m"], "v": layer["codecs"]["both"]["v"]}  # fmt: skip
        for key in (
            [f"err_{x}" for x in SOURCES] + [f"cos_{x}" for x in SOURCES] + ["coupling", "interaction"]
        ):
            entry[f"mean_{key}"] = _mean(r[key] for r in mine)
        out[layer["name"]] = entry
    return out


def _summary(step_rows: list[dict], records: list[dict], layers: list[dict]) -> dict:
    aggregated = {layer["name"] for layer in layers if layer["aggregated"]}
    s: dict = {"measured_steps": len(step_rows), "layers": len(layers),
               "compressed_layers": sum(layer["compressed"] for layer in layers),
               "compressed_numel": sum(layer["numel"] for layer in layers if layer["compressed"]),
               "aggregated_over": "compressed layers" if any(layer["compressed"] for layer in layers) else "all layers"}  # fmt: skip
    keys = (
        [f"err_{x}" for x in SOURCES] + [f"cos_{x}" for x in SOURCES] + [f"global_err_{x}" for x in SOURCES]
    )
    for key in [*keys, *(f"pred_{m}" for m in MODELS), "coupling", "interaction"]:
        s[f"mean_{key}"] = _mean(r.get(key) for r in step_rows)
        s[f"last_{key}"] = step_rows[-1].get(key) if step_rows else None
    mine = [r for r in records if r["layer"] in aggregated]
    s["mean_err_cos"] = _mean(r["err_cos"] for r in mine)
    points = [(r["err_quant"], r["err_factor"], r["err_both"]) for r in mine if r["err_both"] is not None]
    s.update(classify(points))
    return s


# ----------------------------------------------------------------------------------------- outputs
def write_outputs(result: dict, out, command: str | None = None) -> dict[str, Path]:
    """Write ``decomposition.json``, ``decomposition.png`` (if matplotlib is there) and ``decomposition.md``
    into folder ``out`` (created); returns kind -> path of what was written."""
    from ..bench.metrics import write_json_atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if command is not None:
        result = {**result, "command": command}
    paths = {"json": out / "decomposition.json"}
    write_json_atomic(paths["json"], result)
    png = plot_decomposition(result, out / "decomposition.png")
    if png is not None:
        paths["png"] = png
    paths["md"] = out / "decomposition.md"
    paths["md"].write_text(decomposition_markdown(result, png.name if png else None))
    return paths


def plot_decomposition(result: dict, path) -> Path | None:
    """Errors over steps (quant, factor, both, and the three predictions), cosines over steps, and a
    per-layer bar chart of the time-mean errors. ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = result["steps"]
    fig = plt.figure(figsize=(12, 8.5))
    ax1, ax2, ax3 = fig.add_subplot(2, 2, 1), fig.add_subplot(2, 2, 2), fig.add_subplot(2, 1, 2)
    xs = [r["step"] for r in rows]
    colors = {"quant": "tab:blue", "factor": "tab:orange", "both": "tab:red"}
    for x in SOURCES:
        ys = [r[f"err_{x}"] for r in rows]
        if any(y is not None for y in ys):
            ax1.plot(
                xs, [math.nan if y is None else y for y in ys], color=colors[x], lw=2, label=f"{x} (measured)"
            )
            ax2.plot(
                xs,
                [math.nan if r[f"cos_{x}"] is None else r[f"cos_{x}"] for r in rows],
                color=colors[x],
                label=x,
            )
    styles = {
        "linear": ("--", "tab:green"),
        "independent": (":", "tab:purple"),
        "multiplicative": ("-.", "tab:brown"),
    }
    for m in MODELS:
        ys = [r[f"pred_{m}"] for r in rows]
        if any(y is not None for y in ys):
            ax1.plot(xs, [math.nan if y is None else y for y in ys], ls=styles[m][0], color=styles[m][1],
                     label=f"{m} prediction")  # fmt: skip
    ax1.set_xlabel("step")
    ax1.set_ylabel(
        f"||d_x - d|| / ||d||  (numel-weighted, {result['summary']['aggregated_over']})", fontsize=8
    )
    ax1.set_title(f"update-direction error; verdict: {result['summary']['verdict']}", fontsize=10)
    ax1.legend(fontsize=7)
    ax1.grid(alpha=0.3)
    ax2.set_xlabel("step")
    ax2.set_ylabel("cos(d_x, d)")
    ax2.set_title("cosine similarity with the dense AdamW direction", fontsize=10)
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3)
    per = [(n, e) for n, e in result["per_layer"].items() if e["aggregated"]]
    if per:
        width = 0.27
        idx = range(len(per))
        for k, x in enumerate(SOURCES):
            ax3.bar([i + (k - 1) * width for i in idx], [e[f"mean_err_{x}"] or 0.0 for _, e in per], width,
                    color=colors[x], label=x)  # fmt: skip
        ax3.set_xticks(list(idx))
        ax3.set_xticklabels([_short(n) for n, _ in per], rotation=45, ha="right", fontsize=7)
        ax3.legend(fontsize=7)
    ax3.set_ylabel("mean relative error over steps")
    ax3.set_title(f"per layer ({result['summary']['aggregated_over']})", fontsize=10)
    ax3.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _short(name: str) -> str:
    return name.replace("transformer.", "").replace(".weight", "")


def decomposition_markdown(result: dict, png: str | None = "decomposition.png") -> str:
    """A short report: settings, headline numbers, model fit, verdict, per-layer table."""
    s, st = result["summary"], result["settings"]
    lines = ["# Protocol P3: error decomposition of the update direction", ""]
    if result.get("command"):
        lines += ["```", result["command"], "```", ""]
    both = result["variants"]["both"]
    lines += [f"Configuration: m_codec={both.get('m_codec')}, v_codec={both.get('v_codec')} "
              f"(spec `{st.get('spec') or DEFAULT_SPEC}`); trajectory: {st['trajectory']}; {st['steps']} steps, "
              f"measured every {st['every']} ({s['measured_steps']} measurements); model {st.get('model')}, "
              f"{s['compressed_layers']} of {s['layers']} parameters compressed ({s['compressed_numel']} elements); "
              f"{st.get('seconds')} s.", ""]  # fmt: skip
    lines += ["| | quant alone | factor alone | both |", "|---|---|---|---|"]
    for label, key in (("mean rel. error", "mean_err"), ("last rel. error", "last_err"), ("mean cosine", "mean_cos"),
                       ("mean global rel. error", "mean_global_err")):  # fmt: skip
        lines.append(f"| {label} | " + " | ".join(_fmt(s.get(f"{key}_{x}")) for x in SOURCES) + " |")
    lines += ["", f"Predictions of err_both (time mean): linear {_fmt(s.get('mean_pred_linear'))}, independent "
              f"{_fmt(s.get('mean_pred_independent'))}, multiplicative {_fmt(s.get('mean_pred_multiplicative'))}; "
              f"interaction err_both - (e_q + e_f) = {_fmt(s.get('mean_interaction'))}.", ""]  # fmt: skip
    if s.get("fit"):
        lines += ["| model | median measured / predicted | mean abs log ratio |", "|---|---|---|"]
        for m in MODELS:
            f = s["fit"][m]
            mark = " (best)" if m == s["best_model"] else ""
            lines.append(f"| {m}{mark} | {f['median_ratio']:.3f} | {f['mean_abs_log_ratio']:.3f} |")
        lines.append("")
    lines += [f"**Verdict: {s['verdict']}.** {s['verdict_text']}", ""]
    if png:
        lines += [f"![decomposition]({png})", ""]
    lines += ["| layer | m | v | quant | factor | both | coupling |", "|---|---|---|---|---|---|---|"]
    for name, e in result["per_layer"].items():
        if e["aggregated"]:
            lines.append(f"| {_short(name)} | {e['m']} | {e['v']} | {_fmt(e['mean_err_quant'])} | "
                         f"{_fmt(e['mean_err_factor'])} | {_fmt(e['mean_err_both'])} | {_fmt(e['mean_coupling'])} |")  # fmt: skip
    lines += ["", 'Method and format: docs/hybrid_adam.md, "Where the error comes from: protocol P3".', ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    """``effopt decompose``: run ``decompose_errors`` on the harness's tiny LM and write the outputs."""
    import argparse
    import shlex
    import sys

    from ..bench.config import RunConfig
    from ..bench.data import SHIPPED_CORPORA, WIKITEXT
    from ..bench.options import HelpFormatter
    from ..bench.preflight import preflight

    d = RunConfig()
    ap = argparse.ArgumentParser(prog="effopt decompose", formatter_class=HelpFormatter, description=(
        "Protocol P3: run a HybridAdam configuration beside dense fp32 AdamW on the same gradients and split the "
        "error of its update direction into quantization alone, factoring/low rank alone, and both; says whether "
        "they add or multiply. Writes decomposition.json, decomposition.png and decomposition.md."))  # fmt: skip
    ap.add_argument("--spec", default=DEFAULT_SPEC,
                    help="the hybrid configuration, hybrid_adam[+key=value...] (default hybrid_adam: 4-bit m, factored v), "
                    "e.g. hybrid_adam+m_codec=8bit+v_codec=lowrank+rank=8")  # fmt: skip
    ap.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS, help=f"training steps (default {DEFAULT_STEPS})"
    )
    ap.add_argument(
        "--every",
        type=int,
        default=DEFAULT_EVERY,
        help=f"measure every N steps (default {DEFAULT_EVERY}; the last step always)",
    )
    ap.add_argument("--trajectory", choices=TRAJECTORIES, default="adamw",
                    help="whose update moves the model: adamw (default; exact AdamW run) or hybrid (the configuration's own run)")  # fmt: skip
    ap.add_argument(
        "--out", type=Path, default=None, help="output folder (default runs/decompose/<date-time>)"
    )
    ap.add_argument(
        "--data",
        default=d.data,
        help="embedded (default, no download), wikitext-2, wikitext-103 or a text file/folder",
    )
    ap.add_argument("--model", default=d.model, help=f"model preset (default {d.model})")
    ap.add_argument("--layers", type=int, default=None, help="override the preset's number of layers")
    ap.add_argument("--width", type=int, default=None, help="override the preset's hidden size")
    ap.add_argument("--heads", type=int, default=None, help="override the preset's attention heads")
    ap.add_argument(
        "--context", "--ctx", type=int, default=None, help="sequence length (default: the harness's)"
    )
    ap.add_argument(
        "--batch", type=int, default=d.batch_size, help=f"sequences per batch (default {d.batch_size})"
    )
    ap.add_argument(
        "--lr", type=float, default=d.lr, help=f"peak learning rate of the trajectory (default {d.lr})"
    )
    ap.add_argument(
        "--weight-decay",
        type=float,
        default=d.weight_decay,
        help=f"trajectory's weight decay (default {d.weight_decay})",
    )
    ap.add_argument(
        "--clip", type=float, default=d.clip, help=f"gradient-norm clipping, 0 = off (default {d.clip})"
    )
    ap.add_argument(
        "--seed", type=int, default=0, help="model init, batch order and stochastic rounding (default 0)"
    )
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    args = ap.parse_args(argv)
    argv_list = sys.argv[1:] if argv is None else list(argv)
    try:
        data = str(args.data)
        if data not in ("embedded", *SHIPPED_CORPORA, *WIKITEXT) and not Path(data).exists():
            raise ValueError(
                f"data path not found: {data} (use embedded, wikitext-2, wikitext-103 or an existing file/folder)"
            )
        cfg = RunConfig(data=data, model=args.model, layers=args.layers, width=args.width, heads=args.heads,
                        context=args.context, batch_size=args.batch, steps=max(args.steps, 1), lr=args.lr,
                        weight_decay=args.weight_decay, clip=args.clip, seed=args.seed, device=args.device)  # fmt: skip
        cfg.validate()
        parse_hybrid_config(args.spec)
        if args.steps < 1 or args.every < 1:
            raise ValueError(f"--steps and --every must be >= 1 (got {args.steps}, {args.every})")
        out = args.out or Path("runs") / "decompose" / time.strftime("%Y%m%d-%H%M%S")
        preflight([cfg], out, marker=None)  # device, model, data and --out, before any step
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    tick = max(1, args.steps // 10)

    def progress(step: int, total: int) -> None:
        if not args.quiet and (step % tick == 0 or step == total):
            print(
                f"  step {step}/{total}  ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True
            )

    try:
        result = decompose_errors(cfg, args.spec, args.steps, args.every, trajectory=args.trajectory,
                                  progress=progress)  # fmt: skip
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    paths = write_outputs(result, out, command="effopt decompose " + shlex.join(argv_list))
    s = result["summary"]
    print(f"mean relative error of the update direction over {s['measured_steps']} measured steps "
          f"({s['aggregated_over']}: {s['compressed_layers']} of {s['layers']} parameters compressed):")  # fmt: skip
    for x in SOURCES:
        print(f"  {x:7s} {_fmt(s[f'mean_err_{x}'])}   cos {_fmt(s[f'mean_cos_{x}'])}")
    print(f"verdict: {s['verdict']}\n{s['verdict_text']}")
    for path in paths.values():
        print(f"wrote {path}")
    return 0
