"""AdamW with any codec per moment: the one Adam of the library.

``AdamW = AdamW rule x (m codec, v codec) x policy``. ``QAdamW`` (moments at 32/16/8/4 bits), ``HybridAdam``
(different codecs per moment) and ``LowRankAdam`` (a rank-r first moment) are presets of it that keep their
own keyword arguments. The step of each parameter is, in this order: dense fp32 moments -> one
``torch._fused_adamw_`` call per group (``DenseAdamWBatch``); moments a fused kernel covers ->
``kernels.dispatch``; anything else -> the PyTorch reference (decode, ``adamw_update_``, encode).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..kernels.cpu import load_cpu_kernels
from ..kernels.dispatch import AdamStep, FusedAdamBatch
from ..policy.policies import Policy
from ..policy.specs import check_spec
from ..quant import MAP_NAMES, SCALE_DTYPES, QuantMap, mix_salt
from ..quant.blockwise import validate_block_size
from ..quant.rounding import ROUNDING_MODES
from ..state import StateCodec
from ..state.corrected import RESIDUALS
from ..state.spec import codec_to_spec
from .adamw_rule import adamw_update_
from .base import NONFINITE_POLICIES, CodecOptimizer, check_lr
from .dense_adamw import DenseAdamWBatch
from .rule_loop import working_views
from .validation import check_betas, check_choice, check_int, check_nonneg, check_positive

STATE_IDS = {"exp_avg": 0, "exp_avg_sq": 1}  # mixed into the stochastic-rounding salt of each state
_SPEC_BITS = {"8bit": 8, "4bit": 4}


def check_adam_arguments(name: str, nonfinite: str, amsgrad: bool, fused) -> None:
    """The constructor checks every Adam preset shares (``ValueError`` / ``RuntimeError`` naming the argument)."""
    check_choice("nonfinite", nonfinite, NONFINITE_POLICIES)
    if amsgrad:
        raise ValueError(f"amsgrad=True is not supported by {name} (its moments are compressed; "
                         "use torch.optim.AdamW(amsgrad=True) for the AMSGrad variant)")  # fmt: skip
    if fused not in (None, True, False):
        raise ValueError(f"invalid fused: {fused!r} (None, True or False)")
    if fused and load_cpu_kernels() is None:
        raise RuntimeError("fused=True but the CPU kernel could not be built (see the warning above)")


def recordable(spec):
    """A codec instance given as a spec becomes its recorded (plain-data) form, so param groups stay plain data
    and ``state_dict()`` loads with ``torch.load(weights_only=True)``; other specs are returned as they are."""
    if isinstance(spec, StateCodec):
        try:
            return codec_to_spec(spec)
        except TypeError:
            return spec  # not describable as data: kept as the instance (see HybridAdam's placeholders)
    return spec


class AdamW(CodecOptimizer):
    """AdamW (decoupled weight decay) whose two moments are stored by any codec, chosen by a policy.

    Args:
        params: parameters, ``named_parameters()`` (names let policies choose per parameter) or param groups;
            every argument below except ``policy`` can be overridden per group.
        lr: learning rate (default 1e-3; a float or a one-element tensor).
        betas: (beta1, beta2) (default (0.9, 0.999)).
        eps: added to the denominator (default 1e-8).
        weight_decay: decoupled weight decay (default 1e-2, as ``torch.optim.AdamW``).
        m, v: spec of the first / second moment: ``"fp32"`` (default for both: the numbers of
            ``torch.optim.AdamW``), ``"bf16"``, ``"8bit"``, ``"4bit"``, ``"lowrank"``, ``"factored"`` (v only), or
            a ``StateCodec`` instance.
        policy: an ``efficient_optim.policy.Policy`` that may override the spec per parameter (``ByName``) or
            change it during training (``Schedule``); None (default): ``m`` and ``v`` decide.
        rank: rank of the ``"lowrank"`` spec (default None: 16).
        m_map, v_map, m_block_size, v_block_size, rounding, m_rounding, v_rounding, scale_dtype: how the
            ``"8bit"`` / ``"4bit"`` / ``"bf16"`` specs store a moment (see ``QAdamW``; None picks the measured
            defaults of ``policy.specs``; scale_dtype default ``"bfloat16"``).
        min_quantize_numel: tensors with fewer elements (global size) keep fp32 moments whatever the spec
            (default 4096).
        m_correct_every, v_correct_every, ec_residual, map_refit_every: error correction and learned maps
            (see ``QAdamW``).
        seed: seed of stochastic rounding and of the low-rank codecs' sketches (default 0).
        nonfinite: ``"skip"`` (default) the whole step on a NaN/Inf gradient with a warning, or ``"raise"``.
        maximize: maximize the objective (default False).
        amsgrad: must be False (the moments are compressed).
        fused: the fused kernels (``kernels.dispatch``): None (default) when available, False never, True
            always (error if the CPU kernel cannot be built).
        correction_bits, weight_rounding: low-precision parameters (see ``CodecOptimizer``).
    """

    STATE_PREFIX = {"exp_avg": "m", "exp_avg_sq": "v"}
    SPEC_KEYS = ("m", "v")  # the group keys that hold the moments' specs
    rule = "adamw"  # the key of this rule in kernels.dispatch

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        m="fp32",
        v="fp32",
        policy: Policy | None = None,
        rank: int | None = None,
        m_map: str | QuantMap | None = None,
        v_map: str | QuantMap | None = None,
        m_block_size: int | None = None,
        v_block_size: int | None = None,
        rounding: str | None = None,
        m_rounding: str | None = None,
        v_rounding: str | None = None,
        scale_dtype: str = "bfloat16",
        min_quantize_numel: int = 4096,
        seed: int = 0,
        nonfinite: str = "skip",
        maximize: bool = False,
        amsgrad: bool = False,
        fused: bool | None = None,
        correction_bits: int | None = None,
        weight_rounding: str = "auto",
        m_correct_every: int | None = None,
        v_correct_every: int | None = None,
        ec_residual: str = "8bit",
        map_refit_every: int = 100,
    ):
        check_adam_arguments(type(self).__name__, nonfinite, amsgrad, fused)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, m=recordable(m), v=recordable(v),
                        rank=rank, nonfinite=nonfinite, fused=fused)  # fmt: skip
        defaults.update(adam_codec_defaults(
            m_map=m_map, v_map=v_map, m_block_size=m_block_size, v_block_size=v_block_size, rounding=rounding,
            m_rounding=m_rounding, v_rounding=v_rounding, scale_dtype=scale_dtype,
            min_quantize_numel=min_quantize_numel, seed=seed, maximize=maximize, correction_bits=correction_bits,
            weight_rounding=weight_rounding, m_correct_every=m_correct_every, v_correct_every=v_correct_every,
            ec_residual=ec_residual, map_refit_every=map_refit_every,
        ))  # fmt: skip
        super().__init__(params, defaults, policy)

    def default_specs(self, param, group) -> dict:
        return {"exp_avg": group["m"], "exp_avg_sq": group["v"]}

    # ---------------------------------------------------------------------------------- settings
    def add_param_group(self, param_group: dict) -> None:
        for key in self.SPEC_KEYS:
            if key in param_group:
                param_group = {**param_group, key: recordable(param_group[key])}
        super().add_param_group(param_group)

    def validate_group(self, group: dict) -> None:
        check_lr(group["lr"])
        check_betas(group["betas"])
        check_positive("eps", group["eps"])
        check_nonneg("weight_decay", group["weight_decay"])
        specs = self.default_specs(None, group)
        for key, (name, spec) in zip(self.SPEC_KEYS, specs.items()):
            check_spec(spec, key)
            if name == "exp_avg" and spec == "factored":
                raise ValueError(f"invalid {key}: 'factored' stores non-negative states (the second moment) only")
        if group.get("rank") is not None:
            check_int("rank", group["rank"], 1)
        check_codec_options(group, {prefix: _width(spec) for prefix, spec in zip("mv", specs.values())})
        for name, spec in specs.items():  # building the codecs checks map x bits combinations now, not mid-run
            self.resolve_spec(name, spec, None, group)

    # ---------------------------------------------------------------------------------------- step
    def update(self, work):
        for group, items in work:
            dense, fused = DenseAdamWBatch(), FusedAdamBatch(self.rule)
            for index, p, g in items:
                codecs = self.codecs(p, group)
                state = self._init_or_check_state(p, group, codecs, index)
                state["step"] += 1
                mc, vc = codecs["exp_avg"], codecs["exp_avg_sq"]
                if p in self._monitor:
                    self._reference_step(group, index, p, g, state, codecs)
                elif mc.is_dense_fp32 and vc.is_dense_fp32 and dense.accepts(p, g):
                    (m,), (v,) = mc.kernel_operands(state, "exp_avg"), vc.kernel_operands(state, "exp_avg_sq")
                    dense.add(p, g, m, v, state["step"])
                elif group.get("fused") is False or not fused.step(p, g, state, mc, vc, self._adam_step(group, index, state)):
                    self._reference_step(group, index, p, g, state, codecs)
            dense.run(group)
            fused.run()

    def _salt(self, group: dict, index: int, state_name: str, step: int) -> int:
        return mix_salt(group["seed"], index, STATE_IDS[state_name], step)

    def _adam_step(self, group: dict, index: int, state: dict) -> AdamStep:
        step = int(state["step"].item())
        beta1, beta2 = group["betas"]
        return AdamStep(step, group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
                        self._salt(group, index, "exp_avg", step), self._salt(group, index, "exp_avg_sq", step))  # fmt: skip

    def _reference_step(self, group, index, p, g, state, codecs) -> None:
        step = int(state["step"].item())
        beta1, beta2 = group["betas"]
        pw, gw = working_views(p, g)  # fp64 parameters are computed in fp64
        m = codecs["exp_avg"].decode(state, "exp_avg", p).to(pw.dtype)
        v = codecs["exp_avg_sq"].decode(state, "exp_avg_sq", p).to(pw.dtype)
        adamw_update_(pw, gw, m, v, step=step, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                      weight_decay=group["weight_decay"])  # fmt: skip
        if pw is not p:
            p.copy_(pw)
        self._observe(index, p, group, {"exp_avg": m, "exp_avg_sq": v}, grad=gw)
        for name, value in (("exp_avg", m), ("exp_avg_sq", v)):
            codecs[name].encode(state, name, value, salt=self._salt(group, index, name, step))

    def describe_codecs(self, param: torch.Tensor) -> dict[str, StateCodec]:
        """The codec each moment of ``param`` uses (its plan, after the small-tensor and 1-D rules)."""
        group, _ = self._param_index(param)
        return self.codecs(param, group)


def adam_codec_defaults(
    m_map=None, v_map=None, m_block_size=None, v_block_size=None, rounding=None, m_rounding=None, v_rounding=None,
    scale_dtype="bfloat16", min_quantize_numel=4096, seed=0, maximize=False, correction_bits=None,
    weight_rounding="auto", m_correct_every=None, v_correct_every=None, ec_residual="8bit", map_refit_every=100,
) -> dict:  # fmt: skip
    """The codec options every Adam preset takes, with their defaults (documented on ``QAdamW``)."""
    return dict(locals())


def _width(spec) -> int | None:
    """The block-quantized width of a spec (8 or 4), else None."""
    return _SPEC_BITS.get(spec) if isinstance(spec, str) else None


def check_codec_options(group: Mapping, widths: dict[str, int | None]) -> None:
    """``ValueError`` naming any invalid codec option of ``group`` (``widths``: each moment's quantized width)."""
    for prefix in ("m", "v"):
        qmap = group[f"{prefix}_map"]
        if qmap is not None and not isinstance(qmap, QuantMap):
            check_choice(f"{prefix}_map", qmap, MAP_NAMES)
        if group.get(f"{prefix}_correct_every") is not None:
            check_int(f"{prefix}_correct_every", group[f"{prefix}_correct_every"], 1)
        if group[f"{prefix}_rounding"] is not None:
            check_choice(f"{prefix}_rounding", group[f"{prefix}_rounding"], ROUNDING_MODES)
        bs = group[f"{prefix}_block_size"]
        if bs is not None:
            try:
                validate_block_size(bs, widths.get(prefix) or 8)
            except ValueError as exc:
                raise ValueError(f"invalid {prefix}_block_size: {exc}") from None
    if group["rounding"] is not None:
        check_choice("rounding", group["rounding"], ROUNDING_MODES)
    check_choice("scale_dtype", group["scale_dtype"], sorted(SCALE_DTYPES))
    check_int("min_quantize_numel", group["min_quantize_numel"], 0)
    check_int("seed", group["seed"], 0)
    check_choice("ec_residual", group.get("ec_residual", "8bit"), RESIDUALS)
    check_int("map_refit_every", group.get("map_refit_every", 100), 0)
