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

Which moments are quantized and which factored is what each codec says of itself (``StateCodec.error_kind``;
``describe()`` names it in the outputs), so any codec, including one defined outside the library, can be
decomposed. Modules: this one (the shadows and the training loop), ``decomposition_variants`` (the
configurations), ``decomposition_measures`` (measures, model fit, verdict), ``decomposition_report``
(json / png / md outputs); the ``effopt decompose`` command is ``bench.decompose``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable

import torch

from ..optim.hybrid_adam import HybridAdam
from .decomposition_measures import (  # noqa: F401 (public names of the decomposition, re-exported)
    ACTIVE_TOL,
    MODELS,
    SOURCES,
    VERDICTS,
    classify,
    measure_step,
    per_layer_means,
    predictions,
    summarize,
    verdict_text,
)
from .decomposition_report import decomposition_markdown, plot_decomposition, write_outputs  # noqa: F401
from .decomposition_variants import (  # noqa: F401
    DEFAULT_SPEC,
    VARIANTS,
    codec_kind,
    describe_codec,
    is_exact,
    parse_hybrid_config,
    variant_configs,
)

DEFAULT_STEPS = 300
DEFAULT_EVERY = 10
TRAJECTORIES = ("adamw", "hybrid")


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
    if task is None:
        raise ValueError("decompose_errors needs a task: a benchmark run config or task (efficient_optim.bench: "
                         "RunConfig(...) or RunConfig(...).build_task()), or a torch.nn.Module with loss_fn")  # fmt: skip
    if hasattr(task, "build_task"):  # a run config (bench.config.RunConfig): it builds its own task
        task = dataclasses.replace(task, steps=steps).build_task()
    if hasattr(task, "build_model"):  # a task: cfg, device, build_model, train_batch, loss
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
        return _Setup(model, loss_of, lambda s: peak * cfg.lr_factor(s - 1), peak, wd,
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
        f"task must be a run config, a benchmark task or a torch.nn.Module, got {type(task).__name__}"
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
        task: what to train (required): a benchmark run config (``bench.config.RunConfig``: anything with a
            ``build_task()``; its ``steps`` is replaced by ``steps``), a benchmark task (``cfg``, ``device``,
            ``build_model``, ``train_batch``, ``loss``: ``RunConfig(...).build_task()``), or a
            ``torch.nn.Module`` with ``loss_fn`` (trained in place).
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
    _check_arguments(steps, every, trajectory, lr, weight_decay, clip)
    kwargs = parse_hybrid_config(config)
    variants = variant_configs(kwargs)
    setup = _setup(task, steps, loss_fn, lr, weight_decay, clip, kwargs)
    # stochastic rounding follows the run's seed, as in the harness, unless the spec sets one
    if setup.seed is not None:
        for cfg in variants.values():
            cfg.setdefault("seed", setup.seed)
    named = [(n, p) for n, p in setup.model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    device = named[0][1].device
    shadows = {v: _Shadow([p.shape for _, p in named], device, variants[v]) for v in VARIANTS}
    layers = _layer_table(named, shadows)
    t0 = time.perf_counter()
    records, step_rows, skipped = _train(setup, shadows, [p for _, p in named], layers, steps, every,
                                         "dense" if trajectory == "adamw" else "both", progress)  # fmt: skip
    per_layer = per_layer_means(layers, records)
    summary = summarize(step_rows, records, layers)
    summary["skipped_steps"] = skipped
    summary["verdict_text"] = verdict_text(summary)
    settings = {"spec": config if isinstance(config, str) or config is None else repr(config), "steps": steps,
                "every": every, "trajectory": trajectory, "lr_peak": setup.lr_peak, "weight_decay": setup.weight_decay,
                "clip": setup.clip, "seconds": round(time.perf_counter() - t0, 2), **setup.info}  # fmt: skip
    return {"settings": settings, "variants": {v: {k: _plain(x) for k, x in c.items()} for v, c in variants.items()},
            "layers": layers, "records": records, "steps": step_rows, "per_layer": per_layer, "summary": summary}  # fmt: skip


def _check_arguments(steps, every, trajectory, lr, weight_decay, clip) -> None:
    for key, value in (("steps", steps), ("every", every)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
    if trajectory not in TRAJECTORIES:
        raise ValueError(f"trajectory must be one of {TRAJECTORIES}, got {trajectory!r}")
    for key, value in (("lr", lr), ("weight_decay", weight_decay), ("clip", clip)):
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")


def _layer_table(named: list, shadows: dict) -> list[dict]:
    """Per parameter: name, shape, numel, each variant's codecs (as the codecs describe themselves), whether
    it is compressed (some state not stored exactly) and whether it is aggregated (every layer when none is
    compressed, else the compressed ones)."""
    layers = []
    for i, (name, p) in enumerate(named):
        codecs = {v: shadows[v].codecs(i) for v in VARIANTS}
        desc = {v: {"m": describe_codec(c["exp_avg"], p), "v": describe_codec(c["exp_avg_sq"], p)}
                for v, c in codecs.items()}  # fmt: skip
        exact = {v: all(is_exact(c, p) for c in codecs[v].values()) for v in VARIANTS}
        layers.append({"name": name, "shape": list(p.shape), "numel": p.numel(), "codecs": desc,
                       "compressed": not exact["both"], "quant_active": not exact["quant"],
                       "factor_active": not exact["factor"]})  # fmt: skip
    dense = not any(layer["compressed"] for layer in layers)  # a dense configuration: aggregate over every layer
    for layer in layers:
        layer["aggregated"] = dense or layer["compressed"]
    return layers


def _train(setup: _Setup, shadows: dict, params: list, layers: list[dict], steps: int, every: int,
           trajectory_key: str, progress) -> tuple[list[dict], list[dict], int]:  # fmt: skip
    """The training loop: every step's clipped gradient to every shadow, the model moved along the
    ``trajectory_key`` shadow's direction, measures every ``every`` steps and at the last. Returns the
    per-layer records, the per-step rows and the number of steps skipped for a non-finite gradient."""
    records, step_rows, skipped = [], [], 0
    for step in range(1, steps + 1):
        setup.model.zero_grad(set_to_none=True)
        loss = float(setup.loss_of(step))
        if setup.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, setup.clip)
        grads = [torch.zeros_like(p, dtype=torch.float32) if p.grad is None else p.grad.detach().to(torch.float32)
                 for p in params]  # fmt: skip
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            skipped += 1  # no shadow and no parameter changes, as the library's optimizers do
        else:
            d = {v: shadows[v].direction(grads) for v in VARIANTS}
            if step % every == 0 or step == steps:
                step_rows.append(measure_step(step, loss, d, layers, records))
            lr_t = setup.lr_at(step)
            with torch.no_grad():
                for p, dir_ in zip(params, d[trajectory_key]):
                    p32 = p.detach().to(torch.float32)
                    p32.mul_(1 - lr_t * setup.weight_decay).add_(dir_, alpha=-lr_t)
                    p.copy_(p32)
        if progress:
            progress(step, steps)
    setup.model.zero_grad(set_to_none=True)
    return records, step_rows, skipped


def _plain(x):
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, (tuple, list)):
        return [_plain(v) for v in x]
    return repr(x)
