"""HybridAdam: AdamW with a quantized first moment and a factored (or quantized, or low-rank) second moment.

``HybridAdam = AdamW rule x (m codec, v codec)``, a preset of ``optim.adamw.AdamW``. The defaults — m at 4
bits (dynamic map, block 128, stochastic rounding) and v factored into row/column means — hold ~0.52 bytes of
state per parameter on large matrices (15x below fp32 AdamW); 1-D and small tensors keep fp32 moments. The
defaults were chosen from the measurements in docs/hybrid_adam.md.

The step is AdamW's (``adamw_update_``) on the decoded moments. With a factored v the rule sees
``V_hat`` (the rank-1 matrix of the stored row/column means) and divides by the dense
``beta2 * V_hat + (1 - beta2) * g**2`` of this step, bias-corrected as in Adam; what is stored of it is its
row and column means, which is exactly Adafactor's moving average of the row/column statistics (see
``state.factored``).
"""

from __future__ import annotations

from ..policy.specs import DEFAULT_RANK
from ..state import StateCodec
from .adamw import AdamW
from .validation import check_choice

M_CODECS = ("fp32", "bf16", "8bit", "4bit", "lowrank")
V_CODECS = ("fp32", "bf16", "8bit", "4bit", "factored", "lowrank")
_CODEC_KEYS = ("m_codec", "v_codec")
_BLOCK_QUANTIZED = ("4bit", "8bit")  # the codec choices that use a map and a block size
_ROUNDED = ("4bit", "8bit", "bf16")  # ... and those that use a rounding mode
_PLACEHOLDER = "<StateCodec instance: "  # a non-dataclass codec instance in state_dict() (plain strings only)
__all__ = ["DEFAULT_RANK", "HybridAdam", "M_CODECS", "V_CODECS"]


class HybridAdam(AdamW):
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
    keep fp32 moments for 1-D tensors. A codec instance is kept in the param group as its recorded form
    (plain data, ``state.spec``), so ``state_dict()`` loads with ``torch.load(weights_only=True)`` and
    rebuilds it; an instance that is not a dataclass is saved as a description string, and the optimizer that
    loads the checkpoint must be built with the same instance.

    A preset of ``AdamW(m=m_codec, v=v_codec)``; ``policy`` (an ``efficient_optim.policy.Policy``) may override
    the codecs per parameter or over time.

    With ``m_codec="fp32", v_codec="fp32"`` it is ``torch.optim.AdamW`` (tested).

    Fused CPU paths (``fused=None``, the default, or True): both moments quantized use QAdamW's kernel; a
    quantized m with a factored v uses a kernel of its own for fp32 matrices whose row length is a multiple
    of m's block size (the same arithmetic as the reference path up to the summation order of the row and
    column means; thread-count independent, so resuming is exact). ``fused=False`` runs the PyTorch path.
    """

    SPEC_KEYS = _CODEC_KEYS

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2, *,
                 m_codec="4bit", v_codec="factored", rank: int | None = None, **kwargs):  # fmt: skip
        for key in ("bits", "m_bits", "v_bits", "m", "v"):
            if key in kwargs:
                where = "m_codec and v_codec" if key == "bits" else f"{key[0]}_codec"
                raise ValueError(f"HybridAdam sets {key} through {where}; do not pass {key}")
        super().__init__(params, lr, betas, eps, weight_decay, m=m_codec, v=v_codec, rank=rank, **kwargs)
        for short, key in zip(("m", "v"), _CODEC_KEYS):  # AdamW's m / v are HybridAdam's m_codec / v_codec
            self.defaults[key] = self.defaults.pop(short)

    def default_specs(self, param, group) -> dict:
        return {"exp_avg": group["m_codec"], "exp_avg_sq": group["v_codec"]}

    def add_param_group(self, param_group: dict) -> None:
        param_group = dict(param_group)
        for short, key in zip(("m", "v"), _CODEC_KEYS):
            if short in self.defaults:  # (during __init__, before the defaults are renamed)
                param_group.setdefault(key, self.defaults[short])
        super().add_param_group(param_group)
        for short in ("m", "v"):
            self.param_groups[-1].pop(short, None)

    # ---------------------------------------------------------------------------------- settings
    def validate_group(self, group: dict) -> None:
        for key, table in (("m_codec", M_CODECS), ("v_codec", V_CODECS)):
            choice = group[key]
            if isinstance(choice, str):
                check_choice(key, choice, list(table))
        self._check_options_have_effect(group)
        super().validate_group(group)

    def _check_options_have_effect(self, group: dict) -> None:
        """``ValueError`` naming an option that the group's codecs would silently ignore."""
        m, v = (group[key] for key in _CODEC_KEYS)
        codecs = f"m_codec={_describe(m)}, v_codec={_describe(v)}"
        rank = group.get("rank")
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

    # ------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """``AdamW.state_dict()``; a codec instance that is not a dataclass becomes a description string."""
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
                    if isinstance(mine, str) or mine is None:
                        raise ValueError(
                            f"param group {i} of the checkpoint used a codec instance for {key} ({saved}); build "
                            f"the optimizer with that instance (this one has {key}={mine!r})"
                        )
                    g[key] = mine
            groups.append(g)
        super().load_state_dict({**state_dict, "param_groups": groups})


def _describe(choice) -> str:
    """A codec choice for an error message: the string's repr, or the instance's class name."""
    if isinstance(choice, str):
        return repr(choice)
    name = choice.get("codec") if isinstance(choice, dict) else type(choice).__name__
    return f"<{name} instance>"
