"""The one kernel-dispatch table: (device, rule, m codec kind, v codec kind) -> fused kernel.

Every Adam variant of the library asks ``fused_adam_step`` first; it returns False when no fused kernel
covers the parameter (the rule then runs its PyTorch reference path). Codecs say what a kernel gets
(``StateCodec.kernel_kind`` and ``kernel_operands``), so rules never index codec storage.

A table entry says which compiled entry point runs and when it applies. Providers load the compiled kernels
per device: ``cpu`` -> the C++ kernels of ``kernels.cpu``; ``cuda`` -> the Triton kernels of
``kernels.triton_adamw`` when that module and Triton are present.

A bf16 parameter updated through an fp32 master weight (``correction_bits`` or stochastic weight rounding)
reaches the rules as its fp32 master view; ``master_weight`` binds that view to the bf16 storage, and a
provider whose kernels take bf16 weights (``weight_modes``: Triton) steps the bf16 parameter and its
correction codes directly, so the caller skips its own rounding back (``MasterWeight.stepped``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..state import sharded
from .cpu import load_cpu_kernels


@dataclass(frozen=True)
class AdamStep:
    """The hyperparameters and salts of one parameter's Adam step (what every fused Adam kernel takes)."""

    step: int
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    m_salt: int
    v_salt: int

    @property
    def step_size(self) -> float:
        return self.lr / (1 - self.beta1**self.step)

    @property
    def bias_correction2_sqrt(self) -> float:
        return math.sqrt(1 - self.beta2**self.step)


@dataclass(frozen=True)
class FusedKernel:
    """One table entry: ``entry`` is the compiled function's name; ``applies(p, g, mc, vc)`` says whether it
    covers this parameter; ``call(fn, p, g, state, mc, vc, hp)`` runs it."""

    entry: str
    applies: Callable
    call: Callable


def _plain_fp32(p: torch.Tensor, g: torch.Tensor, device: str) -> bool:
    return (type(p.data) is torch.Tensor and p.device.type == device and p.dtype == torch.float32
            and g.dtype == torch.float32)  # fmt: skip


def _quantized_pair_applies(p, g, mc, vc) -> bool:
    return mc.block_size == vc.block_size


def _quantized_pair_call(fn, p, g, state, mc, vc, hp: AdamStep, **weight) -> None:
    target = p if p.is_contiguous() else p.contiguous()  # a strided parameter steps on a copy
    m_codes, m_scales, m_tables, m_geometry, m_signed, m_bits, m_stochastic = mc.kernel_operands(state, "exp_avg")
    v_codes, v_scales, v_tables, v_geometry, v_signed, v_bits, v_stochastic = vc.kernel_operands(state, "exp_avg_sq")
    fn(target, g.contiguous(),
       m_codes, m_scales, m_tables, m_geometry, m_signed, m_bits, m_stochastic, hp.m_salt,
       v_codes, v_scales, v_tables, v_geometry, v_signed, v_bits, v_stochastic, hp.v_salt,
       mc.block_size, hp.lr, hp.beta1, hp.beta2, hp.eps, hp.weight_decay, hp.step_size, hp.bias_correction2_sqrt,
       **weight)  # fmt: skip
    if target is not p:
        p.copy_(target)


def _quantized_factored_applies(p, g, mc, vc) -> bool:
    return p.dim() == 2 and p.is_contiguous() and p.shape[1] % mc.block_size == 0


def _quantized_factored_call(fn, p, g, state, mc, vc, hp: AdamStep) -> None:
    m_codes, m_scales, m_tables, m_geometry, m_signed, m_bits, m_stochastic = mc.kernel_operands(state, "exp_avg")
    row, col, v_eps = vc.kernel_operands(state, "exp_avg_sq")
    fn(p, g.contiguous(), m_codes, m_scales, m_tables, m_geometry, m_signed, m_bits, m_stochastic, hp.m_salt,
       mc.block_size, row, col, v_eps, hp.lr, hp.beta1, hp.beta2, hp.eps, hp.weight_decay, hp.step_size,
       hp.bias_correction2_sqrt)  # fmt: skip


ADAM_KERNELS: dict[tuple[str, str, str], FusedKernel] = {
    ("adamw", "quantized", "quantized"): FusedKernel("adamw_quantized_step", _quantized_pair_applies, _quantized_pair_call),
    ("adamw", "quantized", "factored"): FusedKernel(
        "adamw_quantized_factored_step", _quantized_factored_applies, _quantized_factored_call),
}  # fmt: skip
SHARDABLE = {("adamw", "quantized", "quantized")}  # entries that step a DTensor's local shard (element-wise states)
# entry points that take a bf16 parameter with ``weight_correction=`` / ``weight_salt=`` (when the provider's
# namespace says ``weight_modes``); the others step the fp32 master view
WEIGHT_MODE_ENTRIES = {"adamw_quantized_step", "adamw_quantized_multi_step", "lion_quantized_step",
                       "sgd_quantized_step"}  # fmt: skip


@dataclass
class MasterWeight:
    """The bf16 storage behind a parameter whose rule runs on an fp32 master view (``master_weight``).

    ``low``: the bf16 parameter data; ``correction``: its int8/int16 correction codes (``correction_bits``), or
    None; ``weight_salt``: a callable giving the stochastic-rounding salt of the step being taken (called after
    the step counter advanced), or None. ``stepped`` becomes True when a kernel updated ``low`` (and
    ``correction``) itself: the master view is then stale and must not be rounded back."""

    low: torch.Tensor
    correction: torch.Tensor | None
    weight_salt: Callable[[], int] | None
    stepped: bool = False

    def kwargs(self) -> dict:
        """The kernels' keyword arguments for this weight mode."""
        if self.correction is not None:
            return {"weight_correction": self.correction}
        return {"weight_salt": self.weight_salt()}

    @property
    def mode(self) -> tuple:
        return ("correction", self.correction.dtype) if self.correction is not None else ("stochastic",)


_MASTERS: dict[int, tuple[torch.Tensor, MasterWeight]] = {}  # id(parameter) -> (parameter, its binding)


@contextlib.contextmanager
def master_weight(p, low: torch.Tensor, correction: torch.Tensor | None, weight_salt: Callable[[], int] | None):
    """Within the block, the parameter ``p`` (whose ``.data`` is its fp32 master view) is bound to its bf16
    storage: kernels with bf16 weight modes step ``low`` directly. Yields the ``MasterWeight`` (``stepped``
    says whether that happened), or None when this storage cannot be stepped so (not bf16, not contiguous,
    not exactly one of ``correction`` / ``weight_salt``).

    Args:
        p: the parameter as the rules see it (its data is the fp32 master).
        low: its bf16 data. correction: its int8/int16 correction codes, or None.
        weight_salt: zero-argument callable returning the stochastic-rounding salt, or None.
    """
    eligible = (low.dtype == torch.bfloat16 and type(low) is torch.Tensor and low.is_contiguous()
                and (correction is None) != (weight_salt is None)
                and (correction is None or (correction.is_contiguous() and correction.shape == low.shape)))  # fmt: skip
    if not eligible:
        yield None
        return
    binding = MasterWeight(low, correction, weight_salt)
    _MASTERS[id(p)] = (p, binding)
    try:
        yield binding
    finally:
        _MASTERS.pop(id(p), None)


def _binding(p, kernels, entry: str) -> MasterWeight | None:
    """The bf16 storage ``p`` is bound to, when ``kernels`` can step it through ``entry``; else None."""
    bound = _MASTERS.get(id(p))
    if bound is None or bound[0] is not p or entry not in WEIGHT_MODE_ENTRIES:
        return None
    return bound[1] if getattr(kernels, "weight_modes", False) else None


def _block_ok(kernels, block_size: int) -> bool:
    """Whether ``kernels``' step entry points take this block size: odd sizes (8 bits) only where the
    namespace says ``odd_blocks`` (Triton); the C++ step kernels need even blocks (the reference path then)."""
    return block_size % 2 == 0 or getattr(kernels, "odd_blocks", False)


def _triton_kernels():
    try:
        from .triton_adamw import triton_kernels
    except ImportError:
        return None
    return triton_kernels()


PROVIDERS: dict[str, Callable] = {"cpu": load_cpu_kernels, "cuda": _triton_kernels}


def _local_shard(p, g, mc, vc, hp: AdamStep):
    """A DTensor parameter whose two states are stored for the local shard: the local tensors, the inner
    codecs and the salts shifted to the shard's global position; None when the kernel cannot step it."""
    if not (isinstance(mc, sharded.ShardLocal) and isinstance(vc, sharded.ShardLocal)):
        return None
    if not sharded.is_dtensor(g) or g.placements != p.placements:
        return None
    hp = AdamStep(hp.step, hp.lr, hp.beta1, hp.beta2, hp.eps, hp.weight_decay,
                  sharded.shard_salt(hp.m_salt, p), sharded.shard_salt(hp.v_salt, p))  # fmt: skip
    return p.to_local(), g.to_local(), mc.inner, vc.inner, hp


def _kernels_for(device_type: str):
    provider = PROVIDERS.get(device_type)
    return provider() if provider is not None else None


def fused_adam_step(rule: str, p, g, state: dict, mc, vc, hp: AdamStep) -> bool:
    """Step ``p`` with the fused kernel of ``(rule, mc.kernel_kind, vc.kernel_kind)`` on ``p``'s device when
    the table has one that applies; False (nothing changed) otherwise."""
    if sharded.is_dtensor(p):
        local = _local_shard(p, g, mc, vc, hp)
        if local is None:
            return False
        p, g, mc, vc, hp = local
        if (rule, mc.kernel_kind, vc.kernel_kind) not in SHARDABLE:
            return False
    entry = ADAM_KERNELS.get((rule, mc.kernel_kind, vc.kernel_kind))
    if entry is None or not _plain_fp32(p, g, p.device.type) or not entry.applies(p, g, mc, vc):
        return False
    kernels = _kernels_for(p.device.type)
    fn = getattr(kernels, entry.entry, None) if kernels is not None else None
    if fn is None or not _block_ok(kernels, mc.block_size):
        return False
    bound = _binding(p, kernels, entry.entry)
    if bound is None:
        entry.call(fn, p, g, state, mc, vc, hp)
    else:
        entry.call(fn, bound.low, g, state, mc, vc, hp, **bound.kwargs())
        bound.stepped = True
    return True


MULTI_ENTRY = {("adamw", "quantized", "quantized"): "adamw_quantized_multi_step"}
# single-state rules: (rule, momentum kind) -> entry point; the hyperparameters come as the rule's keyword dict
MOMENTUM_KERNELS = {("lion", "quantized"): "lion_quantized_step", ("sgd", "quantized"): "sgd_quantized_step"}
_MOMENTUM_ARGS = {"lion": ("lr", "beta1", "beta2", "weight_decay"),
                  "sgd": ("lr", "momentum", "dampening", "weight_decay", "nesterov", "first_step")}  # fmt: skip


def fused_momentum_step(rule: str, p, g, state: dict, name: str, mc, salt: int, hyper: dict) -> bool:
    """Step ``p`` with the fused kernel of ``(rule, mc.kernel_kind)`` (Lion, SGD with a quantized momentum) on
    ``p``'s device when its kernels have one (Triton on CUDA); False (nothing changed) otherwise.

    ``hyper``: the rule's hyperparameters by name (``_MOMENTUM_ARGS``)."""
    entry = MOMENTUM_KERNELS.get((rule, mc.kernel_kind))
    if entry is None or sharded.is_dtensor(p) or not p.is_contiguous() or not _plain_fp32(p, g, p.device.type):
        return False
    kernels = _kernels_for(p.device.type)
    fn = getattr(kernels, entry, None)
    if fn is None or not _block_ok(kernels, mc.block_size):
        return False
    bound = _binding(p, kernels, entry)
    codes, scales, tables, geometry, signed, bits, stochastic = mc.kernel_operands(state, name)
    fn(bound.low if bound is not None else p, g, codes, scales, tables, geometry, signed, bits, stochastic, salt,
       mc.block_size, *(hyper[k] for k in _MOMENTUM_ARGS[rule]), **(bound.kwargs() if bound is not None else {}))  # fmt: skip
    if bound is not None:
        bound.stepped = True
    return True


class FusedAdamBatch:
    """The parameters of one group's step that a multi-tensor kernel steps in one launch.

    ``step(p, g, state, mc, vc, hp)`` queues a contiguous plain parameter whose device's kernels have a
    multi-tensor entry for ``(rule, m kind, v kind)`` (Triton on CUDA: ``adamw_quantized_multi_step``), or steps
    it at once through ``fused_adam_step`` otherwise (the CPU kernels step one tensor per call); it returns
    False when no fused kernel applies (nothing changed). ``run()`` launches once per set of parameters that
    share their codecs (maps, widths, rounding and block size) and device.
    """

    def __init__(self, rule: str):
        self.rule = rule
        self._queued: dict[tuple, list] = {}

    def step(self, p, g, state: dict, mc, vc, hp: AdamStep) -> bool:
        key = (self.rule, mc.kernel_kind, vc.kernel_kind)
        entry = ADAM_KERNELS.get(key)
        multi = MULTI_ENTRY.get(key)
        if (multi is None or entry is None or sharded.is_dtensor(p) or not p.is_contiguous()
                or not _plain_fp32(p, g, p.device.type) or not entry.applies(p, g, mc, vc)):  # fmt: skip
            return fused_adam_step(self.rule, p, g, state, mc, vc, hp)
        kernels = _kernels_for(p.device.type)
        if getattr(kernels, multi, None) is None or not _block_ok(kernels, mc.block_size):
            return fused_adam_step(self.rule, p, g, state, mc, vc, hp)
        bound = _binding(p, kernels, multi)
        if bound is not None:
            bound.stepped = True  # stepped by run(), before the caller's update returns
            p = bound.low
        key = (p.device, mc, vc, g.dtype, bound.mode if bound is not None else None)
        self._queued.setdefault(key, []).append((p, g, state, hp, bound))
        return True

    def run(self) -> None:
        for (device, mc, vc, _, mode), items in self._queued.items():
            fn = getattr(_kernels_for(device.type), MULTI_ENTRY[(self.rule, mc.kernel_kind, vc.kernel_kind)])
            ms = [mc.kernel_operands(state, "exp_avg") for _, _, state, _, _ in items]
            vs = [vc.kernel_operands(state, "exp_avg_sq") for _, _, state, _, _ in items]
            hps = [item[3] for item in items]
            weight = {}
            if mode is not None:
                binds = [item[4] for item in items]
                weight = ({"weight_corrections": [b.correction for b in binds]} if mode[0] == "correction"
                          else {"weight_salts": [b.weight_salt() for b in binds]})  # fmt: skip
            m0, v0, hp0 = ms[0], vs[0], hps[0]
            fn([p for p, *_ in items], [g for _, g, *_ in items],
               [m[0] for m in ms], [m[1] for m in ms], m0[2], m0[3], m0[4], m0[5], m0[6], [h.m_salt for h in hps],
               [v[0] for v in vs], [v[1] for v in vs], v0[2], v0[3], v0[4], v0[5], v0[6], [h.v_salt for h in hps],
               mc.block_size, hp0.lr, hp0.beta1, hp0.beta2, hp0.eps, hp0.weight_decay,
               [h.step_size for h in hps], [h.bias_correction2_sqrt for h in hps], **weight)  # fmt: skip
        self._queued = {}


# Adafactor's factored step: one entry for every first-moment kind it covers (None: no first moment)
ADAFACTOR_ENTRY = "adafactor_factored_step"
ADAFACTOR_M_KINDS = (None, "quantized", "dense_float32")
_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def adafactor_kernel_applies(p, g, mc) -> bool:
    """Whether the fused Adafactor step covers ``p``: a plain contiguous non-empty fp32 matrix, a float gradient of its
    shape, and no first moment (``mc`` None), a block-quantized one or a dense fp32 one."""
    return (type(p.data) is torch.Tensor and p.dtype == torch.float32 and p.dim() == 2 and p.is_contiguous()
            and p.numel() > 0 and g.dtype in _GRAD_DTYPES and g.shape == p.shape and not sharded.is_dtensor(g)
            and (None if mc is None else mc.kernel_kind) in ADAFACTOR_M_KINDS)  # fmt: skip


def fused_adafactor_step(p, g, state: dict, vc, mc, hp, portable: bool = False) -> bool:
    """Step ``p`` (Adafactor, factored second moment ``vc``, first moment ``mc`` or None) with the fused kernel
    of ``p``'s device when its provider has one (Triton on CUDA); else, when ``portable``, with the same
    arithmetic in torch/NumPy (``adafactor_order``: the same bits, on any device). False (nothing changed)
    when neither applies. ``hp``: ``adafactor_order.AdafactorScalars``."""
    if not adafactor_kernel_applies(p, g, mc):
        return False
    fn = getattr(_kernels_for(p.device.type), ADAFACTOR_ENTRY, None)
    row, col, v_eps = vc.kernel_operands(state, "exp_avg_sq")
    if fn is not None:
        m = {}
        if mc is not None and mc.kernel_kind == "quantized":
            m["m_quantized"] = (*mc.kernel_operands(state, "exp_avg"), mc.block_size)
        elif mc is not None:
            (m["m_dense"],) = mc.kernel_operands(state, "exp_avg")
        fn(p, g, row, col, v_eps, hp, **m)
        return True
    if not portable:
        return False
    from . import adafactor_order

    adafactor_order.adafactor_factored_step(p, g, row, col, v_eps, hp, mc, state)
    return True
