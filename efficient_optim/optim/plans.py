"""Plans: the codec of every state of a parameter, resolved once and changed only by transcoding.

A ``Plan`` holds, per state name, the spec the policy chose, the codec it resolved to, and the codec the
step uses (the same, or its DTensor adaptation for a sharded parameter). The optimizer builds a parameter's
plan when its state is created (``make_plan``), looks it up at every step, and changes it with
``transcode``: the state is decoded with the old codec and encoded with the new one, exactly once, so
``state_bytes`` shows the new size at once. ``export_plans`` / ``import_plan`` carry plans through
checkpoints as plain data (``state.spec``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..policy.policies import ParamInfo
from ..quant.rounding import mix_salt
from ..state import StateCodec, sharded
from ..state.spec import codec_from_spec, codec_to_spec
from .rule_loop import working_dtype

TRANSCODE_SALT_ID = 11  # stochastic rounding of a transcoded state draws numbers apart from the steps' (ids 0..7)


@dataclass
class Plan:
    """One parameter's plan: ``specs`` (state -> the policy's spec), ``codecs`` (state -> resolved codec) and
    ``step_codecs`` (what the step uses: ``codecs`` adapted to a DTensor parameter's sharding)."""

    specs: dict
    codecs: dict[str, StateCodec]
    step_codecs: dict[str, StateCodec]


def param_info(group: dict, position: int, index: int, param: torch.Tensor) -> ParamInfo:
    """The ``ParamInfo`` of the ``position``-th parameter of ``group`` (global ``index``)."""
    names = group.get("param_names")
    name = names[position] if names is not None and position < len(names) else None
    return ParamInfo(name, index, tuple(param.shape), param.dtype, group)


def adapted(codecs: dict[str, StateCodec], param: torch.Tensor) -> dict[str, StateCodec]:
    """``codecs`` as a DTensor parameter's step uses them (laid out for its sharding); unchanged otherwise."""
    if not sharded.is_dtensor(param):
        return dict(codecs)
    return {name: codec.for_dtensor(param) for name, codec in codecs.items()}


def make_plan(opt, param: torch.Tensor, group: dict, info: ParamInfo) -> Plan:
    """The plan the optimizer's settings and its policy give ``param`` now."""
    specs = opt.policy.choose(info, opt.default_specs(param, group))
    codecs = {name: opt.resolve_spec(name, spec, param, group) for name, spec in specs.items()}
    return Plan(specs, codecs, adapted(codecs, param))


def transcode(opt, param: torch.Tensor, group: dict, index: int, plan: Plan, new: dict[str, StateCodec]) -> None:
    """Re-store each state of ``param`` named in ``new`` with its new codec (decode old, encode new), in place
    in ``opt.state[param]``; ``plan`` is updated. States whose codec does not change are not touched."""
    state = opt.state.get(param)
    new_step = adapted(new, param)
    for name, codec in new.items():
        if plan.codecs.get(name) == codec:
            continue
        if state and "step" in state:
            old = plan.step_codecs[name]
            value = old.decode(state, name, param).to(working_dtype(param)).clone()  # fp64 stays fp64
            for key in [k for k in state if k == name or k.startswith(name + ".")]:
                del state[key]
            new_step[name].init(state, name, param)
            step = int(state["step"].item())
            new_step[name].encode(state, name, value, salt=mix_salt(group.get("seed", 0), index, TRANSCODE_SALT_ID, step))
        plan.codecs[name] = codec
        plan.step_codecs[name] = new_step[name]


def export_plans(plans: dict[int, Plan]) -> dict[int, dict]:
    """``{param index: {state: recorded codec}}`` for a checkpoint (plain data); parameters whose codec cannot
    be described as data are left out (they are re-planned from the settings on load)."""
    out = {}
    for index, plan in plans.items():
        try:
            out[index] = {name: codec_to_spec(codec) for name, codec in plan.codecs.items()}
        except TypeError:
            continue
    return out


def import_plan(recorded: dict) -> dict[str, StateCodec]:
    """The codecs a checkpoint recorded for one parameter."""
    return {name: codec_from_spec(spec) for name, spec in recorded.items()}


def adopt_legacy_layout(opt, index: int, param: torch.Tensor, group: dict) -> None:
    """A checkpoint without recorded plans (written before plans existed) whose small tensor kept a
    ``bf16`` state (the small-tensor rule once spared bf16): the state is transcoded to today's plan."""
    plan = make_plan(opt, param, group, opt._info(param))
    try:
        opt._check_param_state(index, param, opt.state[param], plan.step_codecs)
    except ValueError:
        legacy = {n: opt.resolve_spec(n, spec, param, {**group, "min_quantize_numel": 0})
                  for n, spec in plan.specs.items()}  # fmt: skip
        if any(spec != "bf16" for n, spec in plan.specs.items() if legacy[n] != plan.codecs[n]):
            return  # not that layout: the check that follows names the mismatch
        try:
            opt._check_param_state(index, param, opt.state[param], legacy)
        except ValueError:
            return
        target = dict(plan.codecs)
        plan.codecs, plan.step_codecs = dict(legacy), dict(legacy)
        transcode(opt, param, group, index, plan, target)
    opt._plans[param] = plan


def load_plan(opt, param: torch.Tensor, recorded: dict) -> None:
    """The plan of ``param`` from a checkpoint's record (see ``load_state_dict``)."""
    info = opt._info(param)
    group, index = info.group, info.index
    plan = make_plan(opt, param, group, info)
    saved = import_plan(recorded)
    if opt.policy.dynamic:
        plan.codecs, plan.specs = saved, dict(recorded)
        plan.step_codecs = adapted(saved, param)
    elif export_plans({index: plan}).get(index) != recorded:
        raise ValueError(
            f"parameter #{index} (shape {tuple(param.shape)}) was stored with codecs {saved} but this "
            f"optimizer's settings and policy give {plan.codecs}: the checkpoint was written with other settings"
        )
    opt._plans[param] = plan
