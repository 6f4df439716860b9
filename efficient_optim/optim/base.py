"""Shared base of this library's optimizers: gradient checks, the non-finite-gradient policy, and
codec-aware checkpoint loading (no dtype casting of codes or scales, shapes validated, old checkpoints
filled with today's defaults).
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from abc import abstractmethod
from collections import OrderedDict

import torch

from ..kernels.dispatch import master_weight
from ..policy.policies import Policy
from ..policy.specs import resolve_codec
from ..quant.rounding import mix_salt
from ..state import StateCodec, sharded
from . import master_weights
from .nonfinite import first_nonfinite
from .plans import Plan, adopt_legacy_layout, export_plans, load_plan, make_plan, param_info, transcode
from .validation import check_positive

NONFINITE_POLICIES = ("skip", "raise")
_TORCH_ADDED_DEFAULTS = ("differentiable",)  # set by torch.optim.Optimizer.__setstate__, not ours
_WEIGHT_SALT_ID = 7  # stochastic rounding of weights draws numbers apart from the states' (ids 0, 1, ...)


class CodecOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose states are stored through codecs chosen per parameter.

    Subclasses implement ``default_specs(param, group)`` (state name -> the spec the group's settings give),
    ``validate_group(group)`` and ``update(work)`` (the rule applied to the parameters of one step), and set
    ``STATE_PREFIX`` (state name -> ``"m"`` for a signed state, ``"v"`` for a non-negative one). The codecs
    come from a *plan* per parameter (``optim.plans``): the ``policy`` (``efficient_optim.policy``; default:
    the settings decide) chooses a spec per state when the parameter's state is created, ``resolve_spec``
    turns it into a codec, and ``codecs(param, group)`` looks it up. A dynamic policy may change plans between
    steps; the changed states are transcoded once. ``step()`` is shared: it checks the gradients, applies
    plan changes, routes low-precision parameters through their fp32 master weights (``correction_bits``,
    ``weight_rounding``: see ``optim.master_weights``) and calls ``update``.

    Every optimizer of the library accepts, per group:

    - ``correction_bits``: None (default), 8 or 16. For bf16/fp16 parameters, keep the rounding residual
      of the fp32 master weight in that many bits per parameter, so updates smaller than the parameter's
      precision are not lost (bf16 + 16 bits = fp32 precision in 4 bytes instead of 6).
    - ``weight_rounding``: how an updated low-precision parameter is rounded when ``correction_bits`` is
      None: ``"auto"`` (default: ``"stochastic"``, or ``"nearest"`` with ``correction_bits`` or on a
      DTensor), ``"nearest"`` (what ``copy_`` does), ``"stochastic"`` (unbiased, no memory) or ``"kahan"``
      (a compensation buffer of the parameter's dtype). fp32 parameters are never affected.

    - ``maximize``: False (default) or True: maximize the objective (the gradient's sign is flipped),
      as ``torch.optim``'s ``maximize``.

    ``lr`` may be a Python number or a one-element tensor (as in ``torch.optim``; a scheduler may change
    it in place between steps).

    Non-finite gradients: before any state or parameter is touched, every gradient of the step is
    checked. With ``nonfinite="skip"`` (default) the whole step is skipped (no parameter, state or step
    counter changes), a ``RuntimeWarning`` is issued and ``skipped_steps`` is incremented, as AMP's
    GradScaler does. With ``nonfinite="raise"`` a ``FloatingPointError`` names the first bad parameter.
    """

    skipped_steps: int
    STATE_PREFIX: dict[str, str] = {}

    def __init__(self, params, defaults: dict, policy: Policy | None = None):
        self.skipped_steps = 0
        self._release = None  # the GradientRelease handle while gradient release is on
        self._plans: dict[torch.Tensor, Plan] = {}
        self._monitor: set = set()  # parameters whose exact state values go to the policy at the next step
        self._released: set = set()  # (gradient release) parameters stepped since the last step boundary
        if policy is not None and not isinstance(policy, Policy):
            raise ValueError(f"invalid policy: {policy!r} (an efficient_optim.policy.Policy, e.g. ByName(...))")
        self.policy = policy if policy is not None else Policy()
        defaults.setdefault("correction_bits", None)
        defaults.setdefault("weight_rounding", "auto")
        defaults.setdefault("maximize", False)
        super().__init__(params, defaults)
        if self.policy.needs_names and any(g.get("param_names") is None for g in self.param_groups):
            raise ValueError(f"{type(self).__name__}: policy {self.policy!r} chooses by parameter name; pass "
                             "model.named_parameters() (or groups with (name, parameter) pairs), not parameters()")  # fmt: skip
        self.policy.bind(self)

    # --------------------------------------------------------------------------------- subclass API
    @abstractmethod
    def default_specs(self, param: torch.Tensor, group: dict) -> dict:
        """State name -> spec (``"8bit"``, ``"factored"``, a codec, ...) that ``group``'s settings give ``param``."""

    def resolve_spec(self, name: str, spec, param: torch.Tensor | None, group: dict) -> StateCodec:
        """The codec of state ``name`` under ``spec`` (``policy.specs.resolve_codec`` with the group's options)."""
        return resolve_codec(spec, self.STATE_PREFIX[name], param, group)

    def codecs(self, param: torch.Tensor, group: dict) -> dict[str, StateCodec]:
        """State name -> codec of ``param``: its plan (made now from the settings and the policy if it has none)."""
        plan = self._plans.get(param)
        if plan is None:
            plan = self._plans[param] = make_plan(self, param, group, self._info(param))
        return plan.step_codecs

    # ------------------------------------------------------------------------------------- plans
    def _info(self, param: torch.Tensor):
        """The ``ParamInfo`` of ``param`` (its group, global index, name); ``KeyError`` if it is not ours."""
        index = 0
        for group in self.param_groups:
            for position, p in enumerate(group["params"]):
                if p is param:
                    return param_info(group, position, index, p)
                index += 1
        raise KeyError("parameter is not handled by this optimizer")

    def planned_params(self) -> list[torch.Tensor]:
        """The parameters that have a plan (their state was created), in the optimizer's order."""
        return [p for g in self.param_groups for p in g["params"] if p in self._plans]

    def policy_choice(self, param: torch.Tensor) -> dict:
        """State name -> the spec the policy chooses for ``param`` now (its plan is not changed)."""
        info = self._info(param)
        return self.policy.choose(info, self.default_specs(param, info.group))

    def plan_of(self, param: torch.Tensor) -> dict[str, StateCodec]:
        """State name -> the codec ``param``'s states are stored with (its plan; made now if it has none)."""
        group, _ = self._param_index(param)
        self.codecs(param, group)
        return dict(self._plans[param].codecs)

    @torch.no_grad()
    def set_plan(self, param: torch.Tensor, specs: dict) -> None:
        """Change the codecs of ``param``'s states (state name -> spec); existing states are transcoded once
        (decoded with the old codec, encoded with the new one), so ``state_bytes`` shows the new size at once."""
        group, index = self._param_index(param)
        self.codecs(param, group)
        plan = self._plans[param]
        unknown = sorted(set(specs) - set(plan.codecs))
        if unknown:
            raise ValueError(f"{type(self).__name__}: parameter #{index} has no state {unknown} (it has {sorted(plan.codecs)})")
        new = {name: self.resolve_spec(name, spec, param, group) for name, spec in specs.items()}
        transcode(self, param, group, index, plan, new)
        plan.specs.update(specs)

    def weight_state_bytes(self, param: torch.Tensor, group: dict) -> int:
        """Bytes kept for ``param``'s weight itself (``correction_bits`` codes, a Kahan buffer), which a memory
        budget counts as fixed (``policy.Budget``)."""
        return master_weights.weight_state_bytes(param, group)

    def request_error_stats(self, params) -> None:
        """At the next step, hand the policy (``Policy.observe``) the exact values of these parameters' states
        before they are encoded (they take the reference path for that step)."""
        self._monitor = set(params)

    def _observe(self, index: int, param: torch.Tensor, group: dict, values: dict, grad=None) -> None:
        if param in self._monitor:
            self.policy.observe(self, index, param, group, values, grad=grad)

    def _replan(self) -> None:
        """Apply the changes a dynamic policy asks for before this step."""
        if self.policy.dynamic:
            for param, specs in self.policy.replan(self):
                self.set_plan(param, specs)

    @abstractmethod
    def validate_group(self, group: dict) -> None:
        """Raise ``ValueError`` naming any invalid hyperparameter of ``group``."""

    @abstractmethod
    def update(self, work: list) -> None:
        """Apply the rule to ``work = [(group, [(param_index, param, grad), ...]), ...]`` (finite gradients).

        Parameters seen here are fp32 views for low-precision parameters with a master-weight mode.
        """

    # ----------------------------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict) -> None:
        """``torch.optim.Optimizer.add_param_group``, atomic: a group with an invalid hyperparameter raises
        ``ValueError`` naming it and is not added (the optimizer is left as it was)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            if not isinstance(group["maximize"], bool):
                raise ValueError(f"invalid maximize: {group['maximize']!r} (must be True or False)")
            master_weights.validate(group["correction_bits"], group["weight_rounding"])
            self.validate_group(group)
        except Exception:
            self.param_groups.pop()
            raise

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # a checkpoint written before a hyperparameter existed gets today's default for it (only our own
        # hyperparameters: the keys torch's __setstate__ adds to ``defaults`` are not copied into groups,
        # so state_dict() after load_state_dict() is the dict that was loaded)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                if key not in _TORCH_ADDED_DEFAULTS:
                    group.setdefault(key, value)
        self.__dict__.setdefault("skipped_steps", 0)
        self.__dict__.setdefault("_release", None)
        self.__dict__.setdefault("_plans", {})
        self.__dict__.setdefault("_monitor", set())
        self.__dict__.setdefault("_released", set())
        self.__dict__.setdefault("policy", Policy())

    # -------------------------------------------------------------------------------- the step
    @torch.compiler.disable  # eager inside torch.compile'd code: kernels + codec bookkeeping, nothing to trace
    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.
        """
        if self._release is not None:
            raise RuntimeError(
                f"{type(self).__name__}: gradient release is on, parameters are stepped during backward; "
                "do not call step() (call handle.remove() to go back to normal steps)"
            )
        loss, work = self._begin_step(closure)
        if work is not None:
            self._replan()
            with float_learning_rates(self.param_groups):
                self._apply(work)
            self._monitor = set()
        return loss

    def _apply(self, work: list) -> None:
        """``update`` the plain parameters together, and each master-weight parameter through its fp32 view."""
        plain = []
        for group, items in work:
            direct = []
            for item in items:
                if master_weights.uses_master(item[1], group):
                    self._update_through_master(group, item)
                else:
                    direct.append(item)
            plain.append((group, direct))
        self.update(plain)

    def _update_through_master(self, group: dict, item: tuple) -> None:
        index, p, g = item
        if sharded.is_dtensor(p):
            raise NotImplementedError(
                f"{type(self).__name__}: correction_bits / weight_rounding on a sharded (DTensor) parameter #{index} are "
                "not supported; keep FSDP2's sharded parameters fp32 (MixedPrecisionPolicy computes in bf16)"
            )
        state = self.state[p]
        master = master_weights.open_master(p, state, group)
        low = p.data

        def weight_salt() -> int:
            step = int(state["step"].item()) if "step" in state else 0
            return mix_salt(group.get("seed", 0), index, _WEIGHT_SALT_ID, step)

        stochastic = master_weights.rounding_mode(p, group) == "stochastic"
        correction = state[master_weights.CORRECTION_KEY] if group.get("correction_bits") is not None else None
        p.data = master  # the rule sees (and its states are shaped by) an fp32 parameter
        try:  # a kernel with bf16 weight modes (Triton) may step ``low`` and its correction itself
            with master_weight(p, low, correction, weight_salt if stochastic else None) as bound:
                self.update([(group, [(index, p, g.float())])])
        finally:
            p.data = low
        if bound is not None and bound.stepped:
            return
        p.copy_(master_weights.close_master(p, master, state, group, weight_salt() if stochastic else 0))

    def _param_index(self, param: torch.Tensor) -> tuple[dict, int]:
        info = self._info(param)
        return info.group, info.index

    @torch.no_grad()
    def step_param(self, param: torch.Tensor) -> None:
        """Step one parameter from its current gradient (used by gradient release).

        The non-finite-gradient policy applies to this parameter alone: with ``"skip"`` only its update is
        skipped (``skipped_steps`` counts it). A parameter stepped a second time starts a new optimizer step:
        a dynamic policy re-plans there, as ``step()`` does.
        """
        if param.grad is None:
            return
        if param in self._released or not self._released:  # the first parameter of a new backward: a new step
            if self._released:  # the previous step is over: so is its monitoring
                self._monitor = set()
            self._released = set()
            self._replan()
        self._released.add(param)
        group, index = self._param_index(param)
        work = [(group, [(index, param, -param.grad if group["maximize"] else param.grad)])]
        if first_nonfinite(work) is not None:
            if self.defaults.get("nonfinite", "skip") == "raise":
                raise FloatingPointError(f"{type(self).__name__}: gradient of parameter #{index} contains NaN or Inf")
            self.skipped_steps += 1
            warnings.warn(f"{type(self).__name__}: gradient of parameter #{index} contains NaN or Inf; its update "
                          "was skipped", RuntimeWarning, stacklevel=caller_stacklevel())  # fmt: skip
            return
        with float_learning_rates([group]):
            self._apply(work)

    def _begin_step(self, closure):
        """Run the closure, check gradients; returns ``(loss, work)`` with ``work = None`` if skipped.

        ``work`` is a list of ``(group, [(param_index, param, grad), ...])``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        index = 0
        name = type(self).__name__
        for group in self.param_groups:
            items = []
            for p in group["params"]:
                g = p.grad
                if g is not None:
                    if g.is_sparse:
                        raise RuntimeError(f"{name} does not support sparse gradients (parameter #{index}); use a dense gradient")
                    if g.is_complex() or p.is_complex():
                        raise RuntimeError(f"{name} does not support complex parameters (parameter #{index}); view them as real")
                    items.append((index, p, -g if group["maximize"] else g))
                index += 1
            work.append((group, items))
        bad = first_nonfinite(work)
        if bad is not None:
            policy = self.defaults.get("nonfinite", "skip")
            if policy == "raise":
                raise FloatingPointError(
                    f"{name}: gradient of parameter #{bad} contains NaN or Inf; nothing was updated"
                )
            self.skipped_steps += 1
            warnings.warn(
                f"{name}: gradient of parameter #{bad} contains NaN or Inf; step skipped "
                f"(no parameter or state changed; {self.skipped_steps} skipped so far)",
                RuntimeWarning,
                stacklevel=caller_stacklevel(),
            )
            return loss, None
        return loss, work

    def _init_or_check_state(self, p: torch.Tensor, group: dict, codecs: dict[str, StateCodec], index: int) -> dict:
        state = self.state[p]
        if "step" not in state:  # (weight corrections may already be there)
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            for sname, codec in codecs.items():
                codec.init(state, sname, p)
        else:
            self._check_param_state(index, p, state, codecs)
        return state

    # ----------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """``torch.optim.Optimizer.state_dict()``; for DTensor (FSDP2) parameters, states kept on the local shard
        (quantized codes and scales) are exported as DTensors so ``torch.distributed.checkpoint`` saves every
        rank's part (see ``state.sharded``)."""
        sd = sharded.export_local_states(self, super().state_dict())
        ids = {p: k for p, k in zip((p for g in self.param_groups for p in g["params"]),
                                    (k for g in sd["param_groups"] for k in g["params"]))}  # fmt: skip
        sd["codec_plans"] = export_plans({ids[p]: plan for p, plan in self._plans.items() if p in ids})
        policy_state = self.policy.state_dict()
        if policy_state:
            sd["policy"] = policy_state
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a checkpoint, keeping codes and scales in their saved dtypes and checking their shapes.

        Each parameter's plan is rebuilt: from the checkpoint's recorded codecs under a dynamic policy (and the
        policy's own state is restored), from the settings and the policy otherwise (a recorded plan that
        differs is refused). Raises ``ValueError`` naming the parameter when the checkpoint's states do not fit
        this optimizer's parameters or settings (different shapes, bits, block size, ...).
        """
        state_dict = self._run_load_pre_hooks(state_dict)
        recorded = state_dict.get("codec_plans") or {}
        if state_dict.get("policy") and self.policy.dynamic:
            self.policy.load_state_dict(state_dict["policy"])
        saved_state = state_dict["state"]
        # saved state keys -> parameters as torch maps them: through the groups' "params" lists (indices, or
        # parameter names in the state dicts of torch.distributed.checkpoint's get_optimizer_state_dict)
        saved_ids = [k for g in state_dict["param_groups"] for k in g["params"]]
        hooks = self._optimizer_load_state_dict_pre_hooks
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()  # already run above, on the caller's dict
        try:
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks = hooks
        id_map = dict(zip(saved_ids, (p for g in self.param_groups for p in g["params"])))
        # torch casts every state tensor to a floating parameter's dtype; restore the saved dtypes exactly
        for key, st in saved_state.items():
            p = id_map.get(key)
            if p is None:
                continue
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    self.state[p][k] = v.to(device=p.device, copy=True)
                elif k == "step" and isinstance(v, (int, float)):  # older or hand-written checkpoints
                    self.state[p][k] = torch.tensor(float(v), dtype=torch.float32)
        self._plans = {}
        for key, p in id_map.items():
            if key in recorded and p in self.state and self.state[p]:
                load_plan(self, p, recorded[key])
        sharded.load_local_states(self)  # exported local-shard states of DTensor parameters back to local
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p in self.state and self.state[p]:
                    if p not in self._plans:
                        adopt_legacy_layout(self, index, p, group)
                    self._check_param_state(index, p, self.state[p], self.codecs(p, group))
                index += 1

    def _run_load_pre_hooks(self, state_dict: dict) -> dict:
        """The state dict after every ``register_load_state_dict_pre_hook`` hook (a hook may return a new one)."""
        state_dict = state_dict.copy()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def _check_param_state(self, index: int, p: torch.Tensor, state: dict, codecs: dict[str, StateCodec]) -> None:
        for sname, codec in codecs.items():
            for key, (shape, dtype) in codec.expected(sname, p).items():
                t = state.get(key)
                if t is None:
                    found = sorted(k for k in state if k == sname or k.startswith(sname + "."))
                    raise ValueError(
                        f"state of parameter #{index} (shape {tuple(p.shape)}) has no {key!r} (found {found}): "
                        f"the checkpoint was written with other settings (bits, codec) than this optimizer's"
                    )
                if tuple(t.shape) != shape or t.dtype != dtype:
                    raise ValueError(
                        f"state {key!r} of parameter #{index} (shape {tuple(p.shape)}) is {tuple(t.shape)} {t.dtype}, "
                        f"expected {shape} {dtype}: the checkpoint does not match this model or optimizer settings"
                    )

    # ----------------------------------------------------------------------------------- memory
    def shared_state_tensors(self) -> dict[str, torch.Tensor]:
        """Tables shared by several parameters' states (quantization maps), each once."""
        out: dict[str, torch.Tensor] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p in self.state and self.state[p]:
                    for codec in self.codecs(p, group).values():
                        out.update(codec.shared_tensors())
        return out


def check_lr(lr) -> None:
    """``ValueError`` naming ``lr`` unless it is a finite number > 0 or a one-element tensor holding one."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or lr.is_complex() or not lr.is_floating_point():
            raise ValueError(f"invalid lr: a tensor lr must hold one real floating-point value, got {lr!r}")
        lr = float(lr)
    check_positive("lr", lr)


@contextlib.contextmanager
def float_learning_rates(groups: list[dict]):
    """Within the block, each group's tensor ``lr`` is replaced by its value as a Python float (the rules and
    kernels take numbers); the same tensor object is put back afterwards, so a scheduler that updates it in
    place keeps working."""
    saved = [(g, g["lr"]) for g in groups if isinstance(g.get("lr"), torch.Tensor)]
    for g, lr in saved:
        g["lr"] = float(lr)
    try:
        yield
    finally:
        for g, lr in saved:
            g["lr"] = lr


_SKIPPED_PACKAGES = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(torch.__file__))


def caller_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning point at the user's line that called into the optimizer: the
    first frame outside this package and torch (``step()`` is wrapped by torch's no-grad, compiler and hook
    decorators, so a fixed level would name one of torch's files)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_SKIPPED_PACKAGES):
        frame, level = frame.f_back, level + 1
    return level
