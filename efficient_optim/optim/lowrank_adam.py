"""LowRankAdam: AdamW whose first moment of each weight matrix is kept in rank r (protocol P7).

Four ``update_strategy`` values (the math and the reasons are in docs/lowrank_adam.md):

- ``"online"``: the first moment is ``LowRank(refresh="online")``: each step the rule computes the
  exact EMA update ``beta1 * U V^T + (1 - beta1) g`` (full rank: the current gradient enters the update
  at full rank), uses it for the step, and stores its projection onto a subspace moved by one
  subspace iteration (= one preconditioned gradient step on ``1/2 ||U V^T - g||^2``, "Taming Momentum").
- ``"randomized"`` (default; the best of the four in protocol P7, docs/lowrank_adam.md): the same with
  ``LowRank(refresh="randomized")``: the basis is recomputed by randomized
  SVD of the EMA update every ``svd_freq`` steps and kept fixed in between (``V <- beta1 V + (1 - beta1) g^T U``).
- ``"periodic"``: GaLore (Zhao et al. 2024), its own update rule (``optim.galore``; also registered alone as
  ``galore``): Adam inside a periodically refreshed subspace, not a codec of the full moment.
- ``"factor_ema"``: the plan's sketch, kept as an ablation (``optim.factor_ema_ablation``): EMAs of the
  factors of each gradient, their product as the moment; not a sound EMA (docs/lowrank_adam.md).

A preset of ``optim.adamw.AdamW`` for ``"online"`` / ``"randomized"`` (the rule adds the out-of-subspace tail,
below) and for the dense parameters; ``"periodic"`` and ``"factor_ema"`` parameters are stepped by their rules.

The second moment of the low-rank matrices (``v_storage``, not used by ``"periodic"``): ``"factored"``
(default: Adafactor's row/column statistics, ``m + n`` floats), ``"dense"`` (fp32) or ``"lowrank"``
(``LowRank(nonnegative=True)``: rank-r factors of ``sqrt(v)``). Vectors, small tensors, matrices with
``rank > max_rank_fraction * min(m, n)`` and groups with ``lowrank=False`` keep dense fp32 moments
(exact AdamW, through ``torch._fused_adamw_``).

Diagnostics for P7: ``lowrank_stats()`` gives per low-rank parameter the effective rank of the stored
moment, the relative reconstruction error of the last gradient and of the last moment, and SVD failures.
"""

from __future__ import annotations

from functools import cache

import torch

from ..policy.specs import resolve_codec
from ..quant.rounding import mix_salt
from ..state import Dense, StateCodec
from ..state.lowrank import LowRank, entropy_rank, matrix_shape, numerical_rank, randomized_svd_numel
from ..state.sharded import is_dtensor
from .adamw import AdamW, check_adam_arguments
from .adamw_rule import adamw_update_
from .base import CodecOptimizer, check_lr
from .factor_ema_ablation import FactorEMA, factor_ema_step
from .galore import ProjectedMoment, Projection, galore_step
from .lowrank_support import as_float, encode_state, outside_fraction, svdvals
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


@cache
def _lowrank_codec(rank, refresh, every, oversample, power_iters, seed, nonneg, min_numel, frac) -> LowRank:
    return LowRank(rank, refresh, every, oversample, power_iters, seed, nonneg, min_numel, frac)


# ------------------------------------------------------------------------------------- the optimizer
class LowRankAdam(AdamW):
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
    SPEC_KEYS = ()

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
        check_adam_arguments(type(self).__name__, nonfinite, amsgrad, fused=None)
        self._diag: dict = {}
        self._workspace: torch.Tensor | None = None
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank, svd_freq=svd_freq,
            update_strategy=update_strategy, v_storage=v_storage, oversample=oversample, power_iters=power_iters,
            min_lowrank_numel=min_lowrank_numel, max_rank_fraction=max_rank_fraction, lowrank=lowrank, tail=tail,
            galore_scale=galore_scale, seed=seed, nonfinite=nonfinite, maximize=maximize, correction_bits=correction_bits,
            weight_rounding=weight_rounding,
        )  # fmt: skip
        CodecOptimizer.__init__(self, params, defaults, policy)

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
        """Low-rank (online / randomized) and dense parameters take AdamW's path (dense fp32 moments batched, the
        rest through ``_reference_step``); GaLore and factor-EMA parameters take their own rules."""
        for group, items in work:
            adam_items = []
            for index, p, g in items:
                kind = self.kind(p, group)
                if is_dtensor(p) and kind != "dense":
                    raise NotImplementedError(
                        f"LowRankAdam: parameter #{index} {tuple(p.shape)} is sharded (FSDP2 DTensor) and would get "
                        "low-rank moments, which this optimizer computes on the whole matrix. Use "
                        "create_optimizer('hybrid_adam', ..., m_codec='lowrank') (its factors shard with the "
                        "parameter), DDP, or lowrank=False for this parameter's group (docs/distributed.md)"
                    )
                if kind in ("periodic", "factor_ema"):
                    self._own_rule_step(group, index, p, g, kind)
                else:
                    adam_items.append((index, p, g))
            super().update([(group, adam_items)])

    def _own_rule_step(self, group, index, p, g, kind) -> None:
        codecs = self.codecs(p, group)
        state = self._init_or_check_state(p, group, codecs, index)
        state["step"] += 1
        step = int(state["step"].item())
        p32, g32 = working_views(p, g)  # (fp64 for a fp64 parameter)
        ws = self._arena_buffer(self._workspace_numel(p, group, kind), p.device)
        if kind == "periodic":
            self._diag[p] = galore_step(group, p32, g32, state, step, ws, proj_salt=self._salt(group, index, "proj", step),
                                        every=self.svd_freq(group))  # fmt: skip
        else:
            self._diag[p] = factor_ema_step(group, p32, g32, state, codecs, step, ws,
                                            m_salt=self._salt(group, index, "exp_avg", step),
                                            v_salt=self._salt(group, index, "exp_avg_sq", step))  # fmt: skip
        if p32 is not p:
            p.copy_(p32)

    def _reference_step(self, group, index, p, g, state, codecs) -> None:
        """AdamW's reference step; for a low-rank first moment, the subspace rule of ``_codec_step``."""
        kind = self.kind(p, group)
        if kind == "dense":
            return super()._reference_step(group, index, p, g, state, codecs)
        step = int(state["step"].item())
        p32, g32 = working_views(p, g)
        ws = self._arena_buffer(self._workspace_numel(p, group, kind), p.device)
        self._diag[p] = self._codec_step(group, index, p32, g32, state, codecs, step, ws, kind)
        if p32 is not p:
            p.copy_(p32)

    def _salt(self, group, index, name, step) -> int:
        return mix_salt(group["seed"], index, _STATE_IDS[name], step)

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
        encode_state(mc, state, "exp_avg", m, self._salt(group, index, "exp_avg", step), ws)
        encode_state(vc, state, "exp_avg_sq", v, self._salt(group, index, "exp_avg_sq", step), ws)
        if kind == "dense":
            return None
        u, _ = mc.factors(state, "exp_avg")  # the subspace after this step's encode
        gm = LowRank.matrix(g)  # oriented like the factors: U on the short side
        return {
            "grad_error": outside_fraction(gm, gm.t() @ u),
            "moment_error": mc.relative_error(state, "exp_avg", m),
        }

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
                    "reconstruction_error": as_float(diag.get("grad_error")),
                    "moment_error": as_float(diag.get("moment_error")),
                    "svd_failures": failures, "refreshes": refreshes,
                }  # fmt: skip
        return out

    def _moment_spectrum(self, kind, state, group):
        if kind == "periodic":
            meta = state["proj.meta"]
            return svdvals(state["exp_avg"]), int(meta[1]), int(meta[0])
        if kind == "factor_ema":
            try:
                ra = torch.linalg.qr(state["exp_avg.a"])[1]
                rb = torch.linalg.qr(state["exp_avg.b"])[1]
                sv = svdvals(ra @ rb.t())
            except RuntimeError:
                sv = None
            meta = state["exp_avg.meta"]
            return sv, int(meta[1]), int(meta[0])
        meta = state["exp_avg.meta"]
        failures = int(meta[1])
        if group["v_storage"] == "lowrank":
            failures += int(state["exp_avg_sq.meta"][1])
        return self._m_codec(group).singular_values(state, "exp_avg"), failures, int(meta[0])
