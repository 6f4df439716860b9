"""LowRankAdam: AdamW whose first moment of each weight matrix is kept in rank r (protocol P7).

Four ``update_strategy`` values (the math and the reasons are in docs/lowrank_adam.md):

- ``"online"``: the first moment is ``LowRank(refresh="online")``: each step the rule computes the
  exact EMA update ``beta1 * U V^T + (1 - beta1) g`` (full rank: the current gradient enters the update
  at full rank), uses it for the step, and stores its projection onto a subspace moved by one
  subspace iteration (= one preconditioned gradient step on ``1/2 ||U V^T - g||^2``, "Taming Momentum").
- ``"randomized"`` (default; the best of the four in protocol P7, docs/lowrank_adam.md): the same with
  ``LowRank(refresh="randomized")``: the basis is recomputed by randomized
  SVD of the EMA update every ``svd_freq`` steps and kept fixed in between (``V <- beta1 V + (1 - beta1) g^T U``).
- ``"periodic"``: GaLore (Zhao et al. 2024): every ``svd_freq`` steps the projection ``P`` (top-r left
  singular vectors of the gradient) is refreshed; both moments live in the r x n projected space and
  the Adam direction is projected back: ``W -= lr * scale * P (m_hat / (sqrt(v_hat) + eps))``. A
  different algorithm (Adam inside a moving subspace), not a codec of the full moment. On a refresh the
  moments are rotated into the new basis (``m <- C m``, ``v <- (C*C) v`` with ``C = P_new^T P_old``; the
  part of v with no counterpart in the old basis gets the old column mean): GaLore keeps them unrotated.
- ``"factor_ema"``: the plan's sketch, kept as an ablation: factor each gradient ``g ~ a b^T`` (rank r,
  randomized SVD, signs aligned), keep ``A = EMA(a)``, ``B = EMA(b)`` and use ``A B^T`` as the moment.
  ``EMA(a) EMA(b)^T = sum_s sum_t w_s w_t a_s b_t^T`` while ``EMA(a b^T) = sum_t w_t a_t b_t^T``: the
  product mixes factors of different steps (cross terms s != t) and weights step t by ``w_t^2``, not
  ``w_t`` (docs/lowrank_adam.md has the algebra; tests/test_lowrank.py demonstrates it).

The second moment of the low-rank matrices (``v_storage``, not used by ``"periodic"``): ``"factored"``
(default: Adafactor's row/column statistics, ``m + n`` floats), ``"dense"`` (fp32) or ``"lowrank"``
(``LowRank(nonnegative=True)``: rank-r factors of ``sqrt(v)``). Vectors, small tensors, matrices with
``rank > max_rank_fraction * min(m, n)`` and groups with ``lowrank=False`` keep dense fp32 moments
(exact AdamW, through ``torch._fused_adamw_``).

Diagnostics for P7: ``lowrank_stats()`` gives per low-rank parameter the effective rank of the stored
moment, the relative reconstruction error of the last gradient and of the last moment, and SVD failures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch

from ..policy.specs import resolve_codec
from ..quant.rounding import mix_salt
from ..state import Dense, StateCodec
from ..state.lowrank import (
    Arena,
    LowRank,
    LowRankFailure,
    entropy_rank,
    fallback_basis,
    matrix_shape,
    numerical_rank,
    randomized_svd,
    randomized_svd_numel,
)
from ..state.sharded import is_dtensor
from .adamw_rule import adamw_update_
from .base import NONFINITE_POLICIES, CodecOptimizer, check_lr
from .dense_adamw import DenseAdamWBatch
from .rule_loop import working_views
from .validation import check_betas, check_choice, check_int, check_nonneg, check_positive

UPDATE_STRATEGIES = ("online", "randomized", "periodic", "factor_ema")
V_STORAGE = ("factored", "dense", "lowrank")
TAILS = ("gradient", "ema")
# svd_freq when None, per strategy (from the measurements in docs/lowrank_adam.md). For "online" it is
# how often the subspace is re-drawn by randomized SVD (0: only at the first step); "factor_ema" factors
# every gradient, whatever svd_freq says.
DEFAULT_SVD_FREQ = {"online": 0, "randomized": 10, "periodic": 50, "factor_ema": 1}
_STATE_IDS = {"exp_avg": 0, "exp_avg_sq": 1, "proj": 2}
_DENSE = Dense(torch.float32)


# ------------------------------------------------------------------------- GaLore and sketch states
def _oriented(param: torch.Tensor) -> tuple[int, int]:
    """(short, long) sides of the parameter's matrix: GaLore projects the short side."""
    m, n = matrix_shape(param)
    return min(m, n), max(m, n)


@dataclass(frozen=True)
class ProjectedMoment(StateCodec):
    """A GaLore moment: an r x (long side) tensor in the projected space (not param-shaped)."""

    rank: int

    def expected(self, name, param):
        return {name: ((self.rank, _oriented(param)[1]), torch.float32)}

    def init(self, state, name, param):
        state[name] = torch.zeros(self.rank, _oriented(param)[1], dtype=torch.float32, device=param.device)

    def decode(self, state, name, param):
        return state[name]

    def encode(self, state, name, value, *, salt=0):
        if value is not state[name]:
            state[name].copy_(value)


@dataclass(frozen=True)
class Projection(StateCodec):
    """GaLore's projection ``P`` (short side x r, orthonormal) and ``meta = [refreshes, svd_failures]``."""

    rank: int

    def expected(self, name, param):
        return {name: ((_oriented(param)[0], self.rank), torch.float32), f"{name}.meta": ((2,), torch.int64)}

    def init(self, state, name, param):
        for key, (shape, dtype) in self.expected(name, param).items():
            state[key] = torch.zeros(shape, dtype=dtype, device=param.device)

    def decode(self, state, name, param):
        return state[name]

    def encode(self, state, name, value, *, salt=0):
        state[name].copy_(value)


@dataclass(frozen=True)
class FactorEMA(StateCodec):
    """The plan's sketch: EMAs ``A`` (m x r) and ``B`` (n x r) of the factors of each gradient."""

    rank: int

    def expected(self, name, param):
        m, n = matrix_shape(param)
        return {f"{name}.a": ((m, self.rank), torch.float32), f"{name}.b": ((n, self.rank), torch.float32),
                f"{name}.meta": ((2,), torch.int64)}  # fmt: skip

    def init(self, state, name, param):
        for key, (shape, dtype) in self.expected(name, param).items():
            state[key] = torch.zeros(shape, dtype=dtype, device=param.device)

    def decode(self, state, name, param):
        return (state[f"{name}.a"] @ state[f"{name}.b"].t()).view(param.shape)

    def encode(self, state, name, value, *, salt=0):
        raise NotImplementedError("FactorEMA is updated from gradient factors by LowRankAdam, not encoded")


@cache
def _lowrank_codec(rank, refresh, every, oversample, power_iters, seed, nonneg, min_numel, frac) -> LowRank:
    return LowRank(rank, refresh, every, oversample, power_iters, seed, nonneg, min_numel, frac)


# ------------------------------------------------------------------------------------- the optimizer
class LowRankAdam(CodecOptimizer):
    """AdamW with a rank-r first moment (and a compact second moment) for weight matrices.

    Args:
        params: parameters or param-group dicts; every argument below can be overridden per group.
        lr: learning rate (default 1e-3).
        betas: (beta1, beta2) (default (0.9, 0.999)).
        eps: added to the denominator (default 1e-8).
        weight_decay: decoupled weight decay (default 1e-2).
        rank: rank r of the low-rank states (default 16).
        svd_freq: steps between refreshes of the subspace: the randomized SVD of ``"randomized"``, GaLore's
            projection of ``"periodic"``, the re-drawn subspace of ``"online"`` (0 = never after the first
            step). None (default): ``DEFAULT_SVD_FREQ[update_strategy]``.
        update_strategy: ``"randomized"`` (default), ``"online"``, ``"periodic"`` (GaLore) or
            ``"factor_ema"`` (the plan's sketch; an ablation, not sound). See the module docstring.
        v_storage: second moment of the low-rank matrices: ``"factored"`` (default), ``"dense"`` or
            ``"lowrank"``. Not used by ``"periodic"`` (its v lives in the projected space).
        oversample, power_iters: randomized SVD settings (default 8 and 2).
        min_lowrank_numel: tensors with fewer elements keep dense moments (default 4096).
        max_rank_fraction: matrices with ``rank > max_rank_fraction * min(m, n)`` keep dense moments
            (default 0.5: above it the factors of a square matrix are no smaller than the dense moment).
        lowrank: False keeps a group's parameters dense (e.g. embeddings). Default True.
        tail: the first moment outside the stored subspace (``"online"``/``"randomized"``): ``"gradient"``
            (default: the current gradient, an unbiased estimate) or ``"ema"`` (what the compressed EMA
            gives: ``(1 - beta1) g``, 10x too small for a persistent direction at beta1 = 0.9).
        galore_scale: GaLore's scale alpha of the projected-back update (``"periodic"`` only; default 1.0).
        seed: seed of the random test matrices (mixed with parameter index and step; never the global RNG).
        nonfinite: ``"skip"`` (default) the step on a NaN/Inf gradient with a warning, or ``"raise"``.
        correction_bits, weight_rounding: low-precision parameters, as for every optimizer of the library.
        policy: an ``efficient_optim.policy.Policy`` that may give parameters other specs than the settings
            (e.g. ``ByName({"wte": "fp32"})``); None (default): the settings decide.

    Tensors of more than 2 dimensions are treated as ``(shape[0], prod(shape[1:]))`` matrices.
    """

    STATE_PREFIX = {"exp_avg": "m", "exp_avg_sq": "v", "proj": "m"}

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        rank: int = 16,
        svd_freq: int | None = None,
        update_strategy: str = "randomized",
        v_storage: str = "factored",
        oversample: int = 8,
        power_iters: int = 2,
        min_lowrank_numel: int = 4096,
        max_rank_fraction: float = 0.5,
        lowrank: bool = True,
        tail: str = "gradient",
        galore_scale: float = 1.0,
        seed: int = 0,
        nonfinite: str = "skip",
        maximize: bool = False,
        amsgrad: bool = False,
        correction_bits: int | None = None,
        weight_rounding: str = "auto",
        policy=None,
    ):
        check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        if amsgrad:
            raise ValueError(f"amsgrad=True is not supported by {type(self).__name__} (its moments are compressed; "
                             "use torch.optim.AdamW(amsgrad=True) for the AMSGrad variant)")
        self._diag: dict = {}
        self._workspace: torch.Tensor | None = None
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank, svd_freq=svd_freq,
            update_strategy=update_strategy, v_storage=v_storage, oversample=oversample, power_iters=power_iters,
            min_lowrank_numel=min_lowrank_numel, max_rank_fraction=max_rank_fraction, lowrank=lowrank, tail=tail,
            galore_scale=galore_scale, seed=seed, nonfinite=nonfinite, maximize=maximize, correction_bits=correction_bits,
            weight_rounding=weight_rounding,
        )  # fmt: skip
        super().__init__(params, defaults, policy)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_diag", {})
        self.__dict__.setdefault("_workspace", None)

    # ---------------------------------------------------------------------------------- settings
    def validate_group(self, group: dict) -> None:
        check_lr(group["lr"])
        check_betas(group["betas"])
        check_positive("eps", group["eps"])
        check_nonneg("weight_decay", group["weight_decay"])
        check_int("rank", group["rank"], 1)
        check_choice("update_strategy", group["update_strategy"], UPDATE_STRATEGIES)
        if group["svd_freq"] is not None:
            check_int("svd_freq", group["svd_freq"], 0 if group["update_strategy"] == "online" else 1)
        check_choice("v_storage", group["v_storage"], V_STORAGE)
        check_int("oversample", group["oversample"], 0)
        check_int("power_iters", group["power_iters"], 0)
        check_int("min_lowrank_numel", group["min_lowrank_numel"], 0)
        f = group["max_rank_fraction"]
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise ValueError(f"invalid max_rank_fraction: {f!r} (must be in (0, 1])")
        if not isinstance(group["lowrank"], bool):
            raise ValueError(f"invalid lowrank: {group['lowrank']!r} (True or False)")
        check_choice("tail", group["tail"], TAILS)
        check_positive("galore_scale", group["galore_scale"])
        check_int("seed", group["seed"], 0)

    @staticmethod
    def svd_freq(group: dict) -> int:
        """The group's refresh interval, with ``None`` resolved to the strategy's default."""
        f = group["svd_freq"]
        return DEFAULT_SVD_FREQ[group["update_strategy"]] if f is None else f

    def _m_codec(self, group: dict, *, nonneg: bool = False) -> LowRank:
        strategy = group["update_strategy"]
        refresh = strategy if strategy in ("online", "randomized") else "randomized"
        every = self.svd_freq(group)
        if refresh == "randomized":
            every = max(every, 1)
        return _lowrank_codec(group["rank"], refresh, every, group["oversample"], group["power_iters"],
                              group["seed"], nonneg, group["min_lowrank_numel"], float(group["max_rank_fraction"]))  # fmt: skip

    def _settings_kind(self, param: torch.Tensor, group: dict) -> str:
        """``"dense"`` or the group's update strategy, for ``param``, as the group's settings say."""
        if not group["lowrank"] or not self._m_codec(group).is_lowrank(param):
            return "dense"
        return group["update_strategy"]

    def kind(self, param: torch.Tensor, group: dict) -> str:
        """``"dense"`` or the update strategy ``param`` is stepped with, from its plan (a policy may have
        given it other codecs than the group's settings)."""
        self.codecs(param, group)
        mc = self._plans[param].codecs["exp_avg"]
        if isinstance(mc, ProjectedMoment):
            return "periodic"
        if isinstance(mc, FactorEMA):
            return "factor_ema"
        if isinstance(mc, LowRank) and mc.is_lowrank(param):
            return mc.refresh
        return "dense"

    def _v_codec(self, group: dict) -> StateCodec:
        storage = group["v_storage"]
        if storage == "dense":
            return _DENSE
        if storage == "lowrank":
            return self._m_codec(group, nonneg=True)
        from ..state.factored import Factored

        return Factored()

    def default_specs(self, param, group):
        kind = self._settings_kind(param, group)
        r = group["rank"]
        if kind == "dense":
            return {"exp_avg": "fp32", "exp_avg_sq": "fp32"}  # fp64 for a float64 parameter
        if kind == "periodic":
            return {"exp_avg": ProjectedMoment(r), "exp_avg_sq": ProjectedMoment(r), "proj": Projection(r)}
        if kind == "factor_ema":
            return {"exp_avg": FactorEMA(r), "exp_avg_sq": self._v_codec(group)}
        return {"exp_avg": self._m_codec(group), "exp_avg_sq": self._v_codec(group)}

    def resolve_spec(self, name, spec, param, group):
        """Codec instances (this optimizer's low-rank, GaLore and sketch states) are used as they are (their
        size rules are the group's ``min_lowrank_numel`` / ``max_rank_fraction``); names as every optimizer's."""
        if isinstance(spec, StateCodec):
            return spec
        return resolve_codec(spec, self.STATE_PREFIX[name], param, {**group, "min_quantize_numel": group["min_lowrank_numel"]})

    # ----------------------------------------------------------------------------------- workspace
    def _workspace_numel(self, param, group, kind) -> int:
        if kind in ("online", "randomized"):
            need = self._m_codec(group).workspace_numel(param)
            if group["v_storage"] == "lowrank":
                need = max(need, self._m_codec(group, nonneg=True).workspace_numel(param))
            return need
        if kind in ("periodic", "factor_ema"):
            a, b = matrix_shape(param)
            return randomized_svd_numel(a, b, group["rank"], group["oversample"])
        return 0

    def _arena_buffer(self, numel: int, device) -> torch.Tensor | None:
        if numel == 0:
            return None
        ws = self._workspace
        if ws is None or ws.numel() < numel or ws.device != torch.device(device):
            size = max(numel, 0 if ws is None else ws.numel())
            ws = self._workspace = torch.empty(size, dtype=torch.float32, device=device)
        return ws

    def shared_state_tensors(self) -> dict[str, torch.Tensor]:
        """The SVD/projection workspace (one buffer, sized for the largest matrix), so memory figures count it."""
        out = super().shared_state_tensors()
        if self._workspace is not None:
            out["lowrank.workspace"] = self._workspace
        return out

    # ---------------------------------------------------------------------------------------- step
    def update(self, work):
        for group, items in work:
            dense = DenseAdamWBatch()
            for index, p, g in items:
                if is_dtensor(p) and self.kind(p, group) != "dense":
                    raise NotImplementedError(
                        f"LowRankAdam: parameter #{index} {tuple(p.shape)} is sharded (FSDP2 DTensor) and would get "
                        "low-rank moments, which this optimizer computes on the whole matrix. Use "
                        "create_optimizer('hybrid_adam', ..., m_codec='lowrank') (its factors shard with the "
                        "parameter), DDP, or lowrank=False for this parameter's group (docs/distributed.md)"
                    )
                codecs = self.codecs(p, group)
                state = self._init_or_check_state(p, group, codecs, index)
                state["step"] += 1
                kind = self.kind(p, group)
                if kind == "dense" and codecs["exp_avg"].is_dense_fp32 and dense.accepts(p, g):
                    dense.add(p, g, state["exp_avg"], state["exp_avg_sq"], state["step"])
                    continue
                step = int(state["step"].item())
                p32, g32 = working_views(p, g)  # (fp64 for a fp64 parameter)
                ws = self._arena_buffer(self._workspace_numel(p, group, kind), p.device)
                if kind == "periodic":
                    diag = self._galore_step(group, index, p32, g32, state, step, ws)
                elif kind == "factor_ema":
                    diag = self._factor_ema_step(group, index, p32, g32, state, codecs, step, ws)
                else:
                    diag = self._codec_step(group, index, p32, g32, state, codecs, step, ws, kind)
                if diag is not None:
                    self._diag[p] = diag
                if p32 is not p:
                    p.copy_(p32)
            dense.run(group)

    def _salt(self, group, index, name, step) -> int:
        return mix_salt(group["seed"], index, _STATE_IDS[name], step)

    @staticmethod
    def _encode(codec, state, name, value, salt, ws):
        if isinstance(codec, LowRank):
            codec.encode(state, name, value, salt=salt, workspace=ws)
        else:
            codec.encode(state, name, value, salt=salt)

    def _codec_step(self, group, index, p, g, state, codecs, step, ws, kind) -> dict | None:
        """online / randomized (and dense bf16): decode, the AdamW step, encode (compress) the moments.

        With ``tail="gradient"`` the first moment used for the step is
        ``(beta1 M + (1 - beta1) P g) / (1 - beta1^t) + (I - P) g`` (``P = U U^T``, the stored subspace):
        outside the subspace the momentum is unknown and the current gradient is its unbiased estimate.
        With ``tail="ema"`` it is the plain ``(beta1 M + (1 - beta1) g) / (1 - beta1^t)``. Either way the
        state stored is the compressed EMA update ``beta1 M + (1 - beta1) g``.
        """
        beta1, beta2 = group["betas"]
        mc, vc = codecs["exp_avg"], codecs["exp_avg_sq"]
        m = mc.decode(state, "exp_avg", p).to(p.dtype)
        v = vc.decode(state, "exp_avg_sq", p).to(p.dtype)
        if kind == "dense" or group["tail"] == "ema":
            adamw_update_(p, g, m, v, step=step, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                          weight_decay=group["weight_decay"])  # fmt: skip
        else:
            u, _ = mc.factors(state, "exp_avg")  # the subspace before this step's encode (zeros at step 1)
            gm = LowRank.matrix(g)  # oriented like the factors: U on the short side
            tail = gm - u @ (gm.t() @ u).t()  # (I - U U^T) g, oriented
            if tail.shape[0] != p.shape[0]:
                tail = tail.t()
            tail = tail.reshape(p.shape)
            bc1, bc2 = 1 - beta1**step, 1 - beta2**step
            p.mul_(1 - group["lr"] * group["weight_decay"])
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            mhat = (m - (1 - beta1) * tail).div_(bc1).add_(tail)
            p.addcdiv_(mhat, (v / bc2).sqrt_().add_(group["eps"]), value=-group["lr"])
        self._encode(mc, state, "exp_avg", m, self._salt(group, index, "exp_avg", step), ws)
        self._encode(vc, state, "exp_avg_sq", v, self._salt(group, index, "exp_avg_sq", step), ws)
        if kind == "dense":
            return None
        u, _ = mc.factors(state, "exp_avg")  # the subspace after this step's encode
        gm = LowRank.matrix(g)  # oriented like the factors: U on the short side
        return {
            "grad_error": _outside_fraction(gm, gm.t() @ u),
            "moment_error": mc.relative_error(state, "exp_avg", m),
        }

    def _galore_step(self, group, index, p, g, state, step, ws) -> dict:
        """GaLore: Adam on the projected gradient ``P^T G``, the direction projected back with ``P``."""
        beta1, beta2 = group["betas"]
        r = group["rank"]
        gm = g.reshape(matrix_shape(p))
        flip = gm.shape[0] > gm.shape[1]
        gt = gm.t() if flip else gm  # (short, long)
        proj, meta = state["proj"], state["proj.meta"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        every = max(self.svd_freq(group), 1)
        if (step - 1) % every == 0:
            gen = torch.Generator(device=g.device).manual_seed(self._salt(group, index, "proj", step))
            old = proj.clone() if step > 1 else None
            try:
                new, _, _ = randomized_svd(gt, r, oversample=group["oversample"], power_iters=group["power_iters"],
                                           generator=gen, arena=Arena(ws, g.device))  # fmt: skip
            except LowRankFailure:
                meta[1] += 1
                new = old if old is not None else fallback_basis(gt, r, gen)
            if old is not None and new is not old:
                c = new.t() @ old  # r x r: old coordinates -> new coordinates
                c2 = c.square()
                kept = c2.sum(dim=1, keepdim=True).clamp(
                    0, 1
                )  # the part of each new direction in the old span
                m.copy_(c @ m)
                v.copy_(c2 @ v + (1 - kept) * v.mean(dim=0, keepdim=True))
            proj.copy_(new)
            meta[0] += 1
        rg = proj.t() @ gt  # r x long
        m.lerp_(rg, 1 - beta1)
        v.mul_(beta2).addcmul_(rg, rg, value=1 - beta2)
        bc1, bc2 = 1 - beta1**step, 1 - beta2**step
        n = (m / bc1).div_((v / bc2).sqrt_().add_(group["eps"]))
        upd = proj @ n  # short x long
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.view(gm.shape).add_(upd.t() if flip else upd, alpha=-group["lr"] * group["galore_scale"])
        return {"grad_error": _outside_fraction(gt, rg), "moment_error": None}

    def _factor_ema_step(self, group, index, p, g, state, codecs, step, ws) -> dict:
        """The plan's sketch (ablation): EMAs of the factors of each gradient, their product as the moment."""
        beta1, beta2 = group["betas"]
        r = group["rank"]
        a, b, meta = state["exp_avg.a"], state["exp_avg.b"], state["exp_avg.meta"]
        gm = g.reshape(a.shape[0], -1)
        gen = torch.Generator(device=g.device).manual_seed(self._salt(group, index, "exp_avg", step))
        grad_error = None
        try:
            u, s, w = randomized_svd(gm, r, oversample=group["oversample"], power_iters=group["power_iters"],
                                     generator=gen, arena=Arena(ws, g.device))  # fmt: skip
            root = s.clamp_min(0).sqrt()
            fa, fb = u * root, w * root
            sign = torch.where((fa * a).sum(0) < 0, -1.0, 1.0)  # u_i w_i^T is unchanged by a joint sign flip
            a.lerp_(fa * sign, 1 - beta1)
            b.lerp_(fb * sign, 1 - beta1)
            grad_error = _outside_fraction(gm, s)
        except LowRankFailure:
            meta[1] += 1  # keep the factor EMAs as they are
        meta[0] += 1
        vc = codecs["exp_avg_sq"]
        v = vc.decode(state, "exp_avg_sq", p)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bc1, bc2 = (1 - beta1**step) ** 2, 1 - beta2**step  # each factor EMA carries (1 - beta1^t)
        mhat = (a @ b.t()).view(p.shape).div_(bc1)
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.addcdiv_(mhat, (v / bc2).sqrt_().add_(group["eps"]), value=-group["lr"])
        self._encode(vc, state, "exp_avg_sq", v, self._salt(group, index, "exp_avg_sq", step), ws)
        return {"grad_error": grad_error, "moment_error": None}

    # --------------------------------------------------------------------------------- diagnostics
    @torch.no_grad()
    def lowrank_stats(self, named_parameters=None) -> dict[str, dict]:
        """Per low-rank parameter (that has a state): what P7 measures.

        Keys of each entry: ``shape``, ``strategy``, ``rank``; ``effective_rank`` (entropy effective rank
        ``exp(H(s / sum s))`` of the stored first moment's singular values; 1.0 means rank-1 collapse),
        ``numerical_rank`` (singular values above 1e-3 x the largest), ``reconstruction_error``
        (``||G - P P^T G|| / ||G||``: the part of the last gradient outside the subspace of the low-rank
        state; for ``factor_ema``, the error of the gradient's own rank-r factorization), ``moment_error``
        (``||X - U V^T|| / ||X||`` of the last stored moment for ``online``/``randomized``, else None),
        ``svd_failures`` (count since the start), ``refreshes`` (SVD refreshes or encodes so far).
        Errors are None until the parameter's first step in this process (they are not checkpointed).

        Args:
            named_parameters: optional ``model.named_parameters()`` for the keys (default ``param<i>``).
        """
        names = {id(p): n for n, p in named_parameters} if named_parameters is not None else {}
        out: dict[str, dict] = {}
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                key = names.get(id(p), f"param{index}")
                index += 1
                kind = self.kind(p, group)
                state = self.state.get(p)
                if kind == "dense" or not state:
                    continue
                sv, failures, refreshes = self._moment_spectrum(kind, state, group)
                diag = self._diag.get(p, {})
                out[key] = {
                    "shape": tuple(p.shape), "strategy": kind, "rank": group["rank"],
                    "effective_rank": entropy_rank(sv) if sv is not None else None,
                    "numerical_rank": numerical_rank(sv) if sv is not None else None,
                    "reconstruction_error": _float(diag.get("grad_error")),
                    "moment_error": _float(diag.get("moment_error")),
                    "svd_failures": failures, "refreshes": refreshes,
                }  # fmt: skip
        return out

    def _moment_spectrum(self, kind, state, group):
        if kind == "periodic":
            meta = state["proj.meta"]
            return _svdvals(state["exp_avg"]), int(meta[1]), int(meta[0])
        if kind == "factor_ema":
            try:
                ra = torch.linalg.qr(state["exp_avg.a"])[1]
                rb = torch.linalg.qr(state["exp_avg.b"])[1]
                sv = _svdvals(ra @ rb.t())
            except RuntimeError:
                sv = None
            meta = state["exp_avg.meta"]
            return sv, int(meta[1]), int(meta[0])
        meta = state["exp_avg.meta"]
        failures = int(meta[1])
        if group["v_storage"] == "lowrank":
            failures += int(state["exp_avg_sq.meta"][1])
        return self._m_codec(group).singular_values(state, "exp_avg"), failures, int(meta[0])


def _svdvals(x: torch.Tensor) -> torch.Tensor | None:
    try:
        return torch.linalg.svdvals(x)
    except RuntimeError:
        return None


def _outside_fraction(g: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """``sqrt(1 - ||coeffs||^2 / ||g||^2)``: the relative norm of ``g`` outside an orthonormal basis whose
    coefficients (or the singular values it keeps) are ``coeffs``."""
    g2 = g.square().sum()
    c2 = coeffs.square().sum()
    return torch.where(g2 > 0, (1 - c2 / g2.clamp_min(1e-38)).clamp_min(0).sqrt(), torch.zeros_like(g2))


def _float(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None
