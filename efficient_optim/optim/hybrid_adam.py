"""HybridAdam: AdamW with a quantized first moment and a factored (or quantized, or low-rank) second moment.

``HybridAdam = AdamW rule x (m codec, v codec)``. The defaults — m at 4 bits (dynamic map, block 128,
stochastic rounding) and v factored into row/column means — hold ~0.52 bytes of state per parameter on
large matrices (15x below fp32 AdamW); 1-D and small tensors keep fp32 moments. The defaults were chosen
from the measurements in docs/hybrid_adam.md.

The step is AdamW's (``adamw_update_``) on the decoded moments. With a factored v the rule sees
``V_hat`` (the rank-1 matrix of the stored row/column means) and divides by the dense
``beta2 * V_hat + (1 - beta2) * g**2`` of this step, bias-corrected as in Adam; what is stored of it is its
row and column means, which is exactly Adafactor's moving average of the row/column statistics (see
``state.factored``).
"""

from __future__ import annotations

import math

import torch

from ..kernels.cpu import load_cpu_kernels
from ..state import Quantized, StateCodec, sharded
from ..state.factored import Factored
from .qadamw import QAdamW, _kernel_tables
from .rule_loop import small
from .validation import check_choice, check_int

M_CODECS = {"fp32": 32, "bf16": 16, "8bit": 8, "4bit": 4, "lowrank": None}
V_CODECS = {"fp32": 32, "bf16": 16, "8bit": 8, "4bit": 4, "factored": None, "lowrank": None}
_FACTORED = Factored()
_CODEC_KEYS = ("m_codec", "v_codec")
DEFAULT_RANK = 16  # of the "lowrank" codecs when rank is not given
_BLOCK_QUANTIZED = ("4bit", "8bit")  # the codec choices that use a map and a block size
_ROUNDED = ("4bit", "8bit", "bf16")  # ... and those that use a rounding mode
_PLACEHOLDER = "<StateCodec instance: "  # what a codec instance becomes in state_dict() (plain strings only)


def lowrank_codec(prefix: str, group: dict) -> StateCodec:
    """The ``"lowrank"`` codec of moment ``prefix`` (``efficient_optim.state.lowrank.LowRank``), resolved lazily.

    m: online factor updates (one subspace iteration per step, "Taming Momentum"/LoRA-Pre); v: factors of
    ``sqrt(v)`` refreshed by randomized SVD every 10 steps (never negative when decoded). Pass a ``LowRank``
    instance as ``m_codec`` / ``v_codec`` for other settings.
    """
    try:
        from ..state.lowrank import LowRank
    except ImportError:
        raise ValueError(f"{prefix}_codec='lowrank' needs efficient_optim.state.lowrank, not in this version") from None
    common = dict(rank=group["rank"], seed=group["seed"], min_numel=group["min_quantize_numel"])
    if prefix == "m":
        return LowRank(refresh="online", refresh_every=0, **common)
    return LowRank(refresh="randomized", refresh_every=10, nonnegative=True, **common)


class HybridAdam(QAdamW):
    """AdamW whose moments use different codecs.

    Args:
        params, lr, betas, eps, weight_decay: as ``QAdamW`` / ``torch.optim.AdamW`` (lr default 1e-3,
            weight_decay default 1e-2).
        m_codec: first moment: ``"4bit"`` (default), ``"8bit"``, ``"bf16"``, ``"fp32"``, ``"lowrank"``, or a
            ``StateCodec`` instance (e.g. ``Quantized(...)``, ``LowRank(...)``, an error-feedback wrapper).
        v_codec: second moment: ``"factored"`` (default; row/column means, for >= 2-D tensors), ``"8bit"``,
            ``"4bit"``, ``"bf16"``, ``"fp32"``, ``"lowrank"``, or a ``StateCodec`` instance (it must decode
            to non-negative values).
        rank: rank of the ``"lowrank"`` codecs (default ``None``: 16). Only with ``m_codec`` or ``v_codec``
            ``"lowrank"``: elsewhere it would do nothing, so it raises ``ValueError``.
        **kwargs: every other ``QAdamW`` option (maps, block sizes, rounding, ``scale_dtype``,
            ``min_quantize_numel``, ``seed``, ``nonfinite``, ``correction_bits``, ``weight_rounding``, ...).
            ``bits`` / ``m_bits`` / ``v_bits`` are set through the codecs and are refused, and so is an
            option the chosen codecs ignore (``ValueError``): ``{m,v}_map`` and ``{m,v}_block_size`` need that
            moment at ``"4bit"``/``"8bit"``, ``{m,v}_rounding`` at ``"4bit"``/``"8bit"``/``"bf16"``.

    Every choice can also be set per param group. Tensors with fewer than ``min_quantize_numel`` elements
    (default 4096, global size) keep fp32 moments whatever the codec, and ``"factored"`` / ``"lowrank"``
    keep fp32 moments for 1-D tensors. A codec instance is not saved in ``state_dict()`` (only a
    description string, so ``torch.load(weights_only=True)`` works); the optimizer that loads the
    checkpoint must be built with the same instance.

    With ``m_codec="fp32", v_codec="fp32"`` it is ``torch.optim.AdamW`` (tested).

    Fused CPU paths (``fused=None``, the default, or True): both moments quantized use QAdamW's kernel; a
    quantized m with a factored v uses a kernel of its own for fp32 matrices whose row length is a multiple
    of m's block size (the same arithmetic as the reference path up to the summation order of the row and
    column means; thread-count independent, so resuming is exact). ``fused=False`` runs the PyTorch path.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2, *,
                 m_codec="4bit", v_codec="factored", rank: int | None = None, **kwargs):  # fmt: skip
        self._codec_defaults = {"m_codec": m_codec, "v_codec": v_codec, "rank": rank}
        for key in ("bits", "m_bits", "v_bits"):
            if key in kwargs:
                where = "m_codec and v_codec" if key == "bits" else f"{key[0]}_codec"
                raise ValueError(f"HybridAdam sets {key} through {where}; do not pass {key}")
        super().__init__(params, lr, betas, eps, weight_decay, bits=8, **kwargs)
        self.defaults.update(self._codec_defaults)
        for group in self.param_groups:
            for key, value in self._codec_defaults.items():
                group.setdefault(key, value)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_codec_defaults", {k: self.defaults.get(k) for k in (*_CODEC_KEYS, "rank")})

    # ---------------------------------------------------------------------------------- settings
    def _setting(self, group: dict, key: str):
        return group[key] if key in group else self._codec_defaults[key]

    def validate_group(self, group: dict) -> None:
        for key, table in (("m_codec", M_CODECS), ("v_codec", V_CODECS)):
            choice = self._setting(group, key)
            if not isinstance(choice, StateCodec):
                check_choice(key, choice, list(table))
        if self._setting(group, "rank") is not None:
            check_int("rank", self._setting(group, "rank"), 1)
        self._check_options_have_effect(group)
        super().validate_group(group)
        for prefix in ("m", "v"):  # building the codecs validates the choice now, not mid-run
            self._moment_codec(group, prefix, None)

    def _check_options_have_effect(self, group: dict) -> None:
        """``ValueError`` naming an option that the group's codecs would silently ignore."""
        m, v = (self._setting(group, key) for key in _CODEC_KEYS)
        codecs = f"m_codec={_describe(m)}, v_codec={_describe(v)}"
        rank = self._setting(group, "rank")
        if rank is not None and "lowrank" not in (m, v):
            raise ValueError(f"HybridAdam: rank={rank!r} has no effect with {codecs}: it sets the rank of the "
                             "'lowrank' codec; pass m_codec='lowrank' or v_codec='lowrank', or drop rank")  # fmt: skip
        for prefix, choice in (("m", m), ("v", v)):
            for option, needs in (("map", _BLOCK_QUANTIZED), ("block_size", _BLOCK_QUANTIZED), ("rounding", _ROUNDED)):
                key = f"{prefix}_{option}"
                if group.get(key) is not None and choice not in needs:
                    raise ValueError(f"HybridAdam: {key}={group[key]!r} has no effect with {prefix}_codec="
                                     f"{_describe(choice)}: it applies to {prefix}_codec "
                                     f"{' / '.join(repr(n) for n in needs)} only; drop it or change {prefix}_codec")  # fmt: skip
        if group.get("rounding") is not None and m not in _ROUNDED and v not in _ROUNDED:
            raise ValueError(f"HybridAdam: rounding={group['rounding']!r} has no effect with {codecs}: it applies to "
                             "'4bit' / '8bit' / 'bf16' moments only; drop it")  # fmt: skip

    def _moment_codec(self, group, prefix, p):
        choice = self._setting(group, f"{prefix}_codec")
        if p is not None and (small(p, group) or (choice in ("factored", "lowrank") and p.dim() < 2)):
            return super()._moment_codec({**group, f"{prefix}_bits": 32}, prefix, p)
        if isinstance(choice, StateCodec):
            return choice
        if choice == "factored":
            return _FACTORED
        if choice == "lowrank":
            resolved = {"rank": self._setting(group, "rank") or DEFAULT_RANK, "seed": group["seed"],
                        "min_quantize_numel": group["min_quantize_numel"]}  # fmt: skip
            return lowrank_codec(prefix, resolved)
        bits = (M_CODECS if prefix == "m" else V_CODECS)[choice]
        return super()._moment_codec({**group, f"{prefix}_bits": bits}, prefix, p)

    def _fused_step(self, group, index, p, g, state, mc, vc) -> bool:
        if not (isinstance(mc, Quantized) and isinstance(vc, Factored)):
            return super()._fused_step(group, index, p, g, state, mc, vc)
        if group["fused"] is False or sharded.is_dtensor(p) or type(p.data) is not torch.Tensor:
            return False
        if p.dim() != 2 or p.device.type != "cpu" or p.dtype != torch.float32 or g.dtype != torch.float32:
            return False
        if not p.is_contiguous() or p.shape[1] % mc.block_size:
            return False
        kernels = load_cpu_kernels()
        if kernels is None or not hasattr(kernels, "adamw_quantized_factored_step"):
            return False
        step = int(state["step"].item())
        beta1, beta2 = group["betas"]
        kernels.adamw_quantized_factored_step(
            p, g.contiguous(), state["exp_avg.codes"], state["exp_avg.scales"], *_kernel_tables(mc.qmap), mc.bits,
            mc.rounding == "stochastic", self._salt(group, index, "exp_avg", step), mc.block_size,
            state["exp_avg_sq.row"], state["exp_avg_sq.col"], vc.eps, group["lr"], beta1, beta2, group["eps"],
            group["weight_decay"], group["lr"] / (1 - beta1**step), math.sqrt(1 - beta2**step),
        )  # fmt: skip
        return True

    # ------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """``QAdamW.state_dict()`` with codec instances replaced by description strings (plain data only)."""
        sd = super().state_dict()
        groups = []
        for g in sd["param_groups"]:
            g = dict(g)
            for key in _CODEC_KEYS:
                if isinstance(g.get(key), StateCodec):
                    g[key] = f"{_PLACEHOLDER}{g[key]!r}>"
            groups.append(g)
        return {**sd, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a checkpoint; a saved codec description is replaced by this optimizer's codec instance."""
        current = [{k: g.get(k) for k in _CODEC_KEYS} for g in self.param_groups]
        groups = []
        for i, g in enumerate(state_dict["param_groups"]):
            g = dict(g)
            for key in _CODEC_KEYS:
                saved = g.get(key)
                if isinstance(saved, str) and saved.startswith(_PLACEHOLDER):
                    mine = current[i][key] if i < len(current) else None
                    if not isinstance(mine, StateCodec):
                        raise ValueError(
                            f"param group {i} of the checkpoint used a codec instance for {key} ({saved}); build "
                            f"the optimizer with that instance (this one has {key}={mine!r})"
                        )
                    g[key] = mine
            groups.append(g)
        super().load_state_dict({**state_dict, "param_groups": groups})

    def describe_codecs(self, param: torch.Tensor) -> dict[str, StateCodec]:
        """The codec each moment of ``param`` uses (after the small-tensor and 1-D rules)."""
        group, _ = self._param_index(param)
        return self.codecs(param, group)


def _describe(choice) -> str:
    """A codec choice for an error message: the string's repr, or the instance's class name."""
    return repr(choice) if isinstance(choice, str) else f"<{type(choice).__name__} instance>"
