"""Shared base of this library's optimizers: gradient checks, the non-finite-gradient policy, and
codec-aware checkpoint loading (no dtype casting of codes or scales, shapes validated, old checkpoints
filled with today's defaults).
"""

from __future__ import annotations

import warnings
from abc import abstractmethod

import torch

from ..kernels.cpu import load_cpu_kernels
from ..state import StateCodec

NONFINITE_POLICIES = ("skip", "raise")


class CodecOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose states are stored through codecs chosen per parameter.

    Subclasses implement ``codecs(param, group)`` (state name -> codec) and ``validate_group(group)``.

    Non-finite gradients: before any state or parameter is touched, every gradient of the step is
    checked. With ``nonfinite="skip"`` (default) the whole step is skipped (no parameter, state or step
    counter changes), a ``RuntimeWarning`` is issued and ``skipped_steps`` is incremented, as AMP's
    GradScaler does. With ``nonfinite="raise"`` a ``FloatingPointError`` names the first bad parameter.
    """

    skipped_steps: int

    def __init__(self, params, defaults: dict):
        self.skipped_steps = 0
        super().__init__(params, defaults)

    # --------------------------------------------------------------------------------- subclass API
    @abstractmethod
    def codecs(self, param: torch.Tensor, group: dict) -> dict[str, StateCodec]:
        """State name -> codec for ``param`` under ``group``'s settings."""

    @abstractmethod
    def validate_group(self, group: dict) -> None:
        """Raise ``ValueError`` naming any invalid hyperparameter of ``group``."""

    # ----------------------------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self.validate_group(self.param_groups[-1])

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # a checkpoint written before a hyperparameter existed gets today's default for it
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        self.__dict__.setdefault("skipped_steps", 0)

    # -------------------------------------------------------------------------------- the step
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
                    items.append((index, p, g))
                index += 1
            work.append((group, items))
        bad = self._first_nonfinite(work)
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
                stacklevel=3,
            )
            return loss, None
        return loss, work

    @staticmethod
    def _first_nonfinite(work) -> int | None:
        kernels = load_cpu_kernels()
        for _, items in work:
            for index, _, g in items:
                if g.numel() == 0:
                    continue
                if kernels is not None and g.device.type == "cpu" and g.dtype == torch.float32 and g.is_contiguous():
                    bad = kernels.any_nonfinite_f32(g)
                else:
                    bad = not bool(torch.isfinite(g).all())
                if bad:
                    return index
        return None

    def _init_or_check_state(self, p: torch.Tensor, group: dict, codecs: dict[str, StateCodec], index: int) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            for sname, codec in codecs.items():
                codec.init(state, sname, p)
        else:
            self._check_param_state(index, p, state, codecs)
        return state

    # ----------------------------------------------------------------------------- checkpoints
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a checkpoint, keeping codes and scales in their saved dtypes and checking their shapes.

        Raises ``ValueError`` naming the parameter when the checkpoint's states do not fit this
        optimizer's parameters or settings (different shapes, bits, block size, ...).
        """
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        # torch casts floating-point state to the parameter's dtype; restore the saved dtypes exactly
        for key, st in saved_state.items():
            if not isinstance(key, int) or key >= len(params):
                continue
            p = params[key]
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    self.state[p][k] = v.to(device=p.device, copy=True)
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p in self.state and self.state[p]:
                    self._check_param_state(index, p, self.state[p], self.codecs(p, group))
                index += 1

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
