"""The per-parameter loop every codec-based rule shares: decode states, apply the rule, encode them back."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..quant.rounding import mix_salt


def working_dtype(param: torch.Tensor) -> torch.dtype:
    """The dtype a rule computes in for ``param``: float64 for float64 parameters, float32 otherwise
    (bf16/fp16 parameters are computed in fp32)."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def working_views(param: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The parameter and gradient in ``working_dtype(param)``: the tensors themselves when they already are
    (updates land in place); otherwise copies, and the caller writes the parameter back with ``copy_``."""
    dtype = working_dtype(param)
    p = param if param.dtype == dtype else param.to(dtype)
    g = grad if grad.dtype == dtype else grad.to(dtype)
    return p, g


def begin_param_step(opt, group: dict, index: int, p: torch.Tensor, g: torch.Tensor):
    """One parameter's step begins: its codecs, its (initialized or checked) state with the step counter
    advanced, the step number, and working views of the parameter and gradient (fp32, or fp64 for a float64
    parameter: ``working_views``; the tensors themselves when already in that dtype, otherwise
    write ``p32`` back with ``p.copy_``)."""
    codecs = opt.codecs(p, group)
    state = opt._init_or_check_state(p, group, codecs, index)
    state["step"] += 1
    step = int(state["step"].item())
    p32, g32 = working_views(p, g)
    return codecs, state, step, p32, g32


def run_rule(opt, work: list, rule: Callable, state_ids: dict[str, int], fused: Callable | None = None) -> None:
    """For each parameter: fp32 views of the parameter, gradient and every state; ``rule(group, p, g,
    states, step)`` updates them in place; the parameter and states are written back (stochastic rounding
    salted by seed, parameter index, state and step).

    ``fused(group, p, g, state, codecs, step, salts) -> bool`` (optional) is tried first for an fp32 parameter
    (``salts``: state name -> the salt the reference would use); True means it stepped the parameter."""
    for group, items in work:
        for index, p, g in items:
            codecs, state, step, p32, g32 = begin_param_step(opt, group, index, p, g)
            if fused is not None and p32 is p and g32 is g and p not in opt._monitor and group.get("fused") is not False:
                salts = {name: mix_salt(group.get("seed", 0), index, state_ids[name], step) for name in codecs}
                if fused(group, p, g, state, codecs, step, salts):
                    continue
            views = {name: codec.decode(state, name, p).to(p32.dtype) for name, codec in codecs.items()}
            rule(group, p32, g32, views, step)
            if p32 is not p:
                p.copy_(p32)
            opt._observe(index, p, group, views, grad=g32)
            for name, codec in codecs.items():
                codec.encode(state, name, views[name], salt=mix_salt(group.get("seed", 0), index, state_ids[name], step))
