"""``StateProbe``: per-layer, per-state statistics of any optimizer's states while it trains.

    probe = StateProbe(opt, model.named_parameters(), path="probes.jsonl", every=25)
    with probe:                       # attach: registers the optimizer's public step pre/post hooks
        train(...)                    # records are appended to probes.jsonl (and kept in probe.records)
    probe.error_growth()              # fitted growth exponent of the quantization error, per state

The probe observes from outside, through public surfaces only: ``Optimizer.register_step_pre_hook`` /
``register_step_post_hook``, the optimizer's ``state`` and ``param_groups``, and for this library's
optimizers ``codecs(param, group)`` with each codec's ``decode`` and what the codec says of itself
(``scale_block_size``, ``residual_value``, ``codebook``: see ``state.codec.StateCodec``). Off means detached: no hook is registered, the optimizer runs exactly the code
it runs without a probe and allocates nothing more (tested by counting tensor operations per step).
Attached, steps that are not probe steps cost two Python calls, plus the shadow update when it is on.

What is recorded (JSON lines, every record has ``kind`` and ``step``; definitions in ``analysis.stats``):

- ``state``: per parameter and state at probe steps: mean, std, kurtosis, absmax/std, outlier fraction,
  zero fraction, a log-magnitude histogram, the persistence of the top-``outlier_top`` positions since
  the previous probe step; with ``shadow=True``, the error against an exact fp32 *shadow* state updated
  from the same gradients (relative L2, max, per block, flushed zeros); for error-corrected codecs the
  tracked residual against the true error; for learned codebooks the current levels; every
  ``lowrank_every`` steps the effective rank and rank-r errors of 2-D states.
- ``layer``: per parameter at probe steps: gradient norm, parameter norm, update-to-parameter ratio
  ``||Δθ|| / ||θ||`` of that step; the gradient's effective rank / rank-r errors every ``lowrank_every``;
  for Adam-like states, ``zero_v_nonzero_m_frac``: elements whose stored v is 0 while m is not (their
  update is ``lr * m / eps``: the blow-up of a v map with a zero level), and with a shadow
  ``update_err`` / ``update_err_from_m`` / ``update_err_from_v``: the relative error of the direction
  ``m_hat / (sqrt(v_hat) + eps)`` from the stored states (both, or only m, or only v) against the exact one.
- ``step``: at probe steps: global gradient norm as the optimizer saw it and the global update ratio.
- ``clip``: every step whose gradient norm (after the caller's clipping) sits at the ``clip`` threshold,
  i.e. clipping fired (only when ``clip`` is given).
- ``sharpness``: every ``sharpness_every`` steps, the result of ``sharpness_fn()`` (e.g.
  ``hessian_top_eigenvalue``).
- ``lowrank_stats``: the optimizer's own ``lowrank_stats()`` (LowRankAdam) at probe steps, if it has one.
- ``skipped``: a step the optimizer skipped (non-finite gradient): the shadow is not advanced.
- ``meta`` (first line): settings, histogram edges, parameter names and shapes.

The shadow follows the Adam family's moments (``exp_avg``: ``beta1``, ``g``; ``exp_avg_sq``: ``beta2``,
``g^2``) by default; other rules pass ``shadow_rules``. Gradient release (parameters stepped inside
backward) bypasses ``step()`` and its hooks: probe such runs without release.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

import torch

from ..state.codec import StateCodec
from .probe_records import JsonLinesLog, error_growth, error_series, read_probes  # noqa: F401 (re-exported)
from .stats import (
    HIST_EDGES,
    effective_rank,
    error_stats,
    log_histogram,
    lowrank_errors,
    overlap,
    singular_values,
    tensor_stats,
    top_positions,
)

ShadowRule = Callable[[dict], tuple[float, int]]  # group -> (beta, power of the gradient: 1 or 2)

ADAM_SHADOW: dict[str, ShadowRule] = {
    "exp_avg": lambda group: (group["betas"][0], 1),
    "exp_avg_sq": lambda group: (group["betas"][1], 2),
}


def optimizer_step_count(opt: torch.optim.Optimizer) -> int:
    """The step counter of the first parameter that has one in ``opt.state`` (0 before the first step)."""
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if st and "step" in st:
                s = st["step"]
                return int(s.item()) if isinstance(s, torch.Tensor) else int(s)
    return 0


def state_codecs(opt: torch.optim.Optimizer, p: torch.Tensor, group: dict) -> dict[str, StateCodec]:
    """State name -> codec for optimizers of this library (``{}`` for others)."""
    fn = getattr(opt, "codecs", None)
    if not callable(fn):
        return {}
    try:
        out = dict(fn(p, group))
    except Exception:  # an optimizer whose codecs() needs more than (param, group)
        return {}
    return {name: c for name, c in out.items() if isinstance(c, StateCodec)}


def decoded_states(opt: torch.optim.Optimizer, p: torch.Tensor, group: dict, codecs: dict | None = None) -> dict:
    """State name -> float32 tensor shaped like ``p``, for every state ``p`` has now.

    This library's optimizers: each codec decodes its state (quantized, factored, low-rank, ...). Other
    optimizers: the tensors of ``opt.state[p]`` shaped like ``p`` (``exp_avg``, ``exp_avg_sq``, ...).
    """
    st = opt.state.get(p)
    if not st:
        return {}
    codecs = state_codecs(opt, p, group) if codecs is None else codecs
    out = {}
    if codecs:
        for name, codec in codecs.items():
            keys = codec.keys(name, p)
            if keys and all(k in st for k in keys):
                out[name] = codec.decode(st, name, p).to(torch.float32)
        return out
    for name, t in st.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and tuple(t.shape) == tuple(p.shape) and t.numel() > 1:
            out[name] = t.to(torch.float32)
    return out


class StateProbe:
    """Statistics of an optimizer's states, per parameter and per state, through its step hooks.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (this library's, torch's, bitsandbytes', ...).
        named_parameters: ``model.named_parameters()`` to name records (default ``param<i>``).
        path: JSON-lines file to append records to (``None``: keep them in ``records`` only). On attach,
            lines after the optimizer's current step are dropped (a resumed run does not log twice).
        every: probe every this many steps (default 10); ``early`` steps 1..early are all probed (default
            10: failures of a naive 4-bit state happen in the first steps).
        hist_every: add histograms every this many steps (default: at every probe step).
        shadow: keep an exact fp32 copy of each state that has a shadow rule and report the stored state's
            error against it (default True; costs one fp32 tensor per state while attached).
        shadow_rules: state name -> ``rule(group) -> (beta, power)`` for EMA states
            ``s = beta s + (1 - beta) g**power``; default: Adam's ``exp_avg`` and ``exp_avg_sq``.
        outlier_sigma: threshold of ``outlier_frac`` in standard deviations (default 6).
        outlier_top: fraction of largest-magnitude positions whose persistence is tracked (default 1e-3).
        lowrank_every: effective rank and rank-r errors of 2-D states and gradients every this many steps
            (0 = never, the default; one SVD per matrix).
        lowrank_ranks: the ranks r of those errors (default 8, 16, 32).
        sharpness_fn: called with no arguments every ``sharpness_every`` steps; its dict (or number) is
            recorded (see ``analysis.sharpness.hessian_top_eigenvalue``).
        sharpness_every: default 0 (never).
        clip: the clipping threshold the training loop applies; steps whose gradient norm is at it are
            recorded as ``clip`` events. ``None`` (default): not tracked.
        include: only parameters whose name contains one of these substrings (default: all).
        min_numel: skip parameters with fewer elements (default 1: all).
        keep_records: also keep every record in ``self.records`` (default True).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        named_parameters: Iterable | None = None,
        *,
        path=None,
        every: int = 10,
        early: int = 10,
        hist_every: int | None = None,
        shadow: bool = True,
        shadow_rules: dict[str, ShadowRule] | None = None,
        outlier_sigma: float = 6.0,
        outlier_top: float = 1e-3,
        lowrank_every: int = 0,
        lowrank_ranks=(8, 16, 32),
        sharpness_fn: Callable[[], dict | float] | None = None,
        sharpness_every: int = 0,
        clip: float | None = None,
        include: Iterable[str] | None = None,
        min_numel: int = 1,
        keep_records: bool = True,
    ):
        for name, value, low in (("every", every, 1), ("early", early, 0), ("lowrank_every", lowrank_every, 0),
                                 ("sharpness_every", sharpness_every, 0), ("min_numel", min_numel, 0)):  # fmt: skip
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"invalid {name}: {value!r} (must be an integer >= {low})")
        if hist_every is not None and (not isinstance(hist_every, int) or hist_every < 1):
            raise ValueError(f"invalid hist_every: {hist_every!r} (must be an integer >= 1 or None)")
        if not 0 < outlier_top < 1:
            raise ValueError(f"invalid outlier_top: {outlier_top!r} (must be in (0, 1))")
        self.optimizer = optimizer
        names = {id(p): n for n, p in named_parameters} if named_parameters is not None else {}
        include = tuple(include) if include is not None else None
        self.params: list[tuple[str, torch.Tensor, dict]] = []
        index = 0
        for group in optimizer.param_groups:
            for p in group["params"]:
                name = names.get(id(p), f"param{index}")
                index += 1
                if p.numel() < min_numel or (include is not None and not any(s in name for s in include)):
                    continue
                self.params.append((name, p, group))
        self.log = JsonLinesLog(path)
        self.every, self.early, self.hist_every = every, early, hist_every
        self.shadow_on = shadow
        self.shadow_rules = dict(ADAM_SHADOW if shadow_rules is None else shadow_rules)
        self.outlier_sigma, self.outlier_top = outlier_sigma, outlier_top
        self.lowrank_every, self.lowrank_ranks = lowrank_every, tuple(lowrank_ranks)
        self.sharpness_fn, self.sharpness_every = sharpness_fn, sharpness_every
        self.clip = clip
        self.keep_records = keep_records
        self.records: list[dict] = []
        self.step = 0
        self.overhead_s = 0.0  # time spent inside the probe's hooks
        self._handles: list = []
        self._shadow: dict[tuple[int, str], torch.Tensor] | None = None
        self._top: dict[tuple[int, str], torch.Tensor] = {}
        self._before: dict[int, torch.Tensor] | None = None
        self._grad_norms: dict[int, float] | None = None
        self._skipped_before = 0
        self._started = False

    # ------------------------------------------------------------------------------ attach / detach
    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> StateProbe:
        """Register the step hooks (idempotent)."""
        if not self._handles:
            self._handles = [
                self.optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.pre_step()),
                self.optimizer.register_step_post_hook(lambda opt, args, kwargs: self.post_step()),
            ]
        return self

    def detach(self) -> None:
        """Remove the hooks and drop the shadow states (the records stay)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._shadow = None
        self._before = None
        self._started = False

    def __enter__(self) -> StateProbe:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    # ------------------------------------------------------------------------------------- schedule
    def is_probe_step(self, step: int) -> bool:
        return step <= self.early or step % self.every == 0

    def _emit(self, records: list[dict]) -> None:
        if self.keep_records:
            self.records.extend(records)
        self.log.write(records)

    def _start(self) -> None:
        """First hook call after attaching: the step count, the log, the shadow from the current states."""
        self._started = True
        self.step = optimizer_step_count(self.optimizer)
        self.log.truncate_after(self.step)
        if self.step == 0 or not self.log.path or not self.log.path.is_file() or self.log.path.stat().st_size == 0:
            meta = {"kind": "meta", "step": self.step, "hist_edges": HIST_EDGES, "every": self.every, "early": self.early,
                    "shadow": self.shadow_on, "outlier_sigma": self.outlier_sigma, "outlier_top": self.outlier_top,
                    "lowrank_ranks": list(self.lowrank_ranks), "clip": self.clip,
                    "optimizer": type(self.optimizer).__name__,
                    "params": [{"name": n, "shape": list(p.shape), "numel": p.numel()} for n, p, _ in self.params]}  # fmt: skip
            self._emit([meta])
        if self.shadow_on:
            self._shadow = {}
            for i, (_, p, group) in enumerate(self.params):
                states = decoded_states(self.optimizer, p, group)
                for sname in self.shadow_rules:
                    init = states.get(sname)
                    self._shadow[(i, sname)] = init.detach().clone() if init is not None else torch.zeros_like(p, dtype=torch.float32)
            if self.step > 0:
                self._emit([{"kind": "shadow_start", "step": self.step,
                             "note": "shadow initialized from the stored states: errors count from this step"}])  # fmt: skip

    # ---------------------------------------------------------------------------------------- hooks
    @torch.no_grad()
    def pre_step(self) -> None:
        """Called before ``optimizer.step()`` (by the hook): what the step needs from before it."""
        t0 = time.perf_counter()
        if not self._started:
            self._start()
        self._skipped_before = getattr(self.optimizer, "skipped_steps", 0)
        upcoming = self.step + 1
        if self.is_probe_step(upcoming):
            self._before = {i: p.detach().to(torch.float32, copy=True) for i, (_, p, _) in enumerate(self.params)}
            self._grad_norms = {i: float(p.grad.detach().float().norm()) for i, (_, p, _) in enumerate(self.params)
                                if p.grad is not None}  # fmt: skip
        if self.clip is not None:
            norms = [p.grad.detach().float().norm() for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            total = float(torch.stack(norms).norm()) if norms else 0.0
            if total >= self.clip * (1 - 1e-4):
                self._emit([{"kind": "clip", "step": upcoming, "grad_norm": total, "clip": self.clip}])
        self.overhead_s += time.perf_counter() - t0

    @torch.no_grad()
    def post_step(self) -> None:
        """Called after ``optimizer.step()`` (by the hook): advance the shadow, record at probe steps."""
        t0 = time.perf_counter()
        if not self._started:  # attached between a pre and a post hook
            self._start()
        if getattr(self.optimizer, "skipped_steps", 0) > self._skipped_before:
            self._emit([{"kind": "skipped", "step": self.step + 1}])
            self._before = None
            self.overhead_s += time.perf_counter() - t0
            return
        self.step += 1
        if self._shadow is not None:
            self._advance_shadow()
        if self.is_probe_step(self.step):
            self._record()
        if self.sharpness_fn is not None and self.sharpness_every and self.step % self.sharpness_every == 0:
            res = self.sharpness_fn()
            rec = {"kind": "sharpness", "step": self.step}
            rec.update(res if isinstance(res, dict) else {"eigenvalue": float(res)})
            self._emit([rec])
        self._before = None
        self._grad_norms = None
        self.overhead_s += time.perf_counter() - t0

    def _advance_shadow(self) -> None:
        for i, (_, p, group) in enumerate(self.params):
            if p.grad is None:
                continue
            g = p.grad.detach().to(torch.float32)
            for sname, rule in self.shadow_rules.items():
                s = self._shadow.get((i, sname))
                if s is None:
                    continue
                beta, power = rule(group)
                s.mul_(beta).add_(g if power == 1 else g * g, alpha=1 - beta)

    # -------------------------------------------------------------------------------------- records
    def _record(self) -> None:
        step = self.step
        hist = self.hist_every is None or step % self.hist_every == 0 or step <= self.early
        lowrank = self.lowrank_every and step % self.lowrank_every == 0
        records = []
        num = den = 0.0
        gsq = 0.0
        for i, (name, p, group) in enumerate(self.params):
            codecs = state_codecs(self.optimizer, p, group)
            states = decoded_states(self.optimizer, p, group, codecs)
            layer = {"kind": "layer", "step": step, "param": name, "numel": p.numel()}
            pf = p.detach().to(torch.float32)
            layer["param_norm"] = float(pf.norm())
            if self._grad_norms is not None and i in self._grad_norms:
                layer["grad_norm"] = self._grad_norms[i]
                gsq += self._grad_norms[i] ** 2
            if self._before is not None:
                b = self._before[i]
                dn, bn = float((pf - b).norm()), float(b.norm())
                layer["update_ratio"] = dn / bn if bn > 0 else None
                num += dn * dn
                den += bn * bn
            if lowrank and p.grad is not None and p.dim() >= 2:
                sv = singular_values(p.grad.detach())
                layer["grad_effective_rank"] = effective_rank(p.grad, sv)
                layer["grad_lowrank_err"] = {str(k): v for k, v in lowrank_errors(p.grad, self.lowrank_ranks, sv).items()}
            if "exp_avg" in states and "exp_avg_sq" in states:  # Adam: where the update is m / eps
                m_s, v_s = states["exp_avg"], states["exp_avg_sq"]
                layer["zero_v_nonzero_m_frac"] = float(((v_s == 0) & (m_s != 0)).to(torch.float64).mean())
                if self._shadow is not None and "betas" in group and "eps" in group:
                    layer.update(_adam_direction_errors(m_s, v_s, self._shadow.get((i, "exp_avg")),
                                                        self._shadow.get((i, "exp_avg_sq")), group, step))  # fmt: skip
            records.append(layer)
            for sname, x in states.items():
                records.append(self._state_record(i, sname, x, codecs.get(sname), hist, lowrank))
        step_rec = {"kind": "step", "step": step}
        if self._grad_norms is not None:
            step_rec["grad_norm"] = math.sqrt(gsq)
        if den > 0:
            step_rec["update_ratio"] = math.sqrt(num / den)
        records.append(step_rec)
        stats_fn = getattr(self.optimizer, "lowrank_stats", None)
        if callable(stats_fn):
            names = [(n, p) for n, p, _ in self.params]
            try:
                stats = stats_fn(names)
            except TypeError:
                stats = stats_fn()
            records.append({"kind": "lowrank_stats", "step": step, "stats": _jsonable(stats)})
        self._emit(records)

    def _state_record(self, i: int, sname: str, x: torch.Tensor, codec: StateCodec | None, hist: bool,
                      lowrank: bool) -> dict:  # fmt: skip
        """The ``state`` record of state ``sname`` (decoded value ``x``, stored by ``codec``) of parameter ``i``."""
        name, p, _ = self.params[i]
        rec = {"kind": "state", "step": self.step, "param": name, "state": sname}
        rec.update(tensor_stats(x, self.outlier_sigma))
        if hist:
            rec["hist"], rec["hist_zeros"] = log_histogram(x)
        top = top_positions(x, self.outlier_top)
        prev = self._top.get((i, sname))
        rec["top_persistence"] = overlap(top, prev) if prev is not None else None
        self._top[(i, sname)] = top
        shadow = self._shadow.get((i, sname)) if self._shadow is not None else None
        if shadow is not None:
            block = codec.scale_block_size if codec is not None else None
            rec.update(error_stats(x, shadow, block or 256))
            rec["shadow_rms"] = float(shadow.norm()) / math.sqrt(max(1, shadow.numel()))
        if codec is not None:
            rec.update(_codec_records(codec, self.optimizer.state[p], sname, p, x, shadow))
        if lowrank and x.dim() >= 2:
            sv = singular_values(x)
            rec["effective_rank"] = effective_rank(x, sv)
            rec["lowrank_err"] = {str(k): v for k, v in lowrank_errors(x, self.lowrank_ranks, sv).items()}
        return rec

    # ------------------------------------------------------------------------------------- summaries
    def error_growth(self, min_step: int = 1) -> dict:
        """Per state name: the growth exponent of the total error ``sqrt(sum over parameters of err_l2^2)``
        and of the mean relative error over steps (see ``analysis.stats.growth_exponent``)."""
        return error_growth(self.records, min_step)


def _codec_records(codec: StateCodec, state: dict, name: str, p, stored, shadow) -> dict:
    """What ``codec`` tracks of state ``name`` beyond its value: the norm of its residual (and, against the
    exact ``shadow``, how closely the residual follows the stored state's true error) and its codebook."""
    rec: dict = {}
    e = codec.residual_value(state, name, p)
    if e is not None:
        rec["residual_norm"] = float(e.norm())
        if shadow is not None:
            dn = float((shadow - stored).norm())
            rec["residual_tracking_err"] = float((e - (shadow - stored)).norm()) / dn if dn > 0 else None
    levels = codec.codebook(state, name)
    if levels is not None:
        rec["levels"] = [round(v, 7) for v in levels.tolist()]
    return rec


def _adam_direction_errors(m_q, v_q, m_s, v_s, group: dict, step: int) -> dict:
    """Relative error of Adam's direction ``m_hat / (sqrt(v_hat) + eps)`` built from the stored states
    against the one built from the exact shadow states, and with only m or only v stored: which state's
    storage perturbs the update, and by how much."""
    if m_s is None or v_s is None:
        return {}
    b1, b2 = group["betas"]
    bc1, bc2, eps = 1 - b1**step, 1 - b2**step, group["eps"]

    def direction(m, v):
        return (m / bc1) / ((v.clamp(min=0) / bc2).sqrt() + eps)

    exact = direction(m_s, v_s)
    n = float(exact.norm())
    if n == 0:
        return {}
    return {"update_err": float((direction(m_q, v_q) - exact).norm()) / n,
            "update_err_from_m": float((direction(m_q, v_s) - exact).norm()) / n,
            "update_err_from_v": float((direction(m_s, v_q) - exact).norm()) / n}  # fmt: skip


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
