"""HybridAdam: AdamW with a quantized first moment and a factored (or quantized, or low-rank) second moment.

``HybridAdam = AdamW rule x (m codec, v codec)``. The defaults — m at 4 bits (dynamic map, block 128,
stochastic rounding) and v factored into row/column means — hold ~0.52 bytes of state per parameter on
large matrices (15x below fp32 AdamW); 1-D and small tensors keep fp32 moments. The defaults were chosen
from the measurements in docs/hybrid_adam.md.
"""

from __future__ import annotations

from ..state import StateCodec
from ..state.factored import Factored
from .qadamw import QAdamW
from .rule_loop import small
from .validation import check_choice

M_CODECS = {"fp32": 32, "bf16": 16, "8bit": 8, "4bit": 4, "lowrank": None}
V_CODECS = {"fp32": 32, "bf16": 16, "8bit": 8, "4bit": 4, "factored": None, "lowrank": None}
_FACTORED = Factored()


def _lowrank_codec(group: dict):
    try:
        from ..state.lowrank import LowRank
    except ImportError:
        raise ValueError("v_codec/m_codec 'lowrank' needs efficient_optim.state.lowrank, not in this version") from None
    return LowRank(rank=group["rank"])


class HybridAdam(QAdamW):
    """AdamW whose moments use different codecs.

    Args:
        params, lr, betas, eps, weight_decay: as ``QAdamW`` / ``torch.optim.AdamW`` (lr default 1e-3,
            weight_decay default 1e-2).
        m_codec: first moment: ``"4bit"`` (default), ``"8bit"``, ``"bf16"``, ``"fp32"``, ``"lowrank"``, or a
            ``StateCodec`` instance.
        v_codec: second moment: ``"factored"`` (default; row/column means, for >= 2-D tensors), ``"8bit"``,
            ``"4bit"``, ``"bf16"``, ``"fp32"``, ``"lowrank"``, or a ``StateCodec``.
        rank: rank of ``"lowrank"`` codecs (default 16).
        **kwargs: every other ``QAdamW`` option (maps, block sizes, rounding, ``min_quantize_numel``, ``seed``,
            ``nonfinite``, ``correction_bits``, ``weight_rounding``, ...).

    With ``m_codec="fp32", v_codec="fp32"`` it is ``torch.optim.AdamW`` (tested).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2, *,
                 m_codec="4bit", v_codec="factored", rank: int = 16, **kwargs):  # fmt: skip
        self._codec_defaults = {"m_codec": m_codec, "v_codec": v_codec, "rank": rank}
        for prefix, codec, table in (("m", m_codec, M_CODECS), ("v", v_codec, V_CODECS)):
            if not isinstance(codec, StateCodec):
                check_choice(f"{prefix}_codec", codec, list(table))
            if f"{prefix}_bits" in kwargs:
                raise ValueError(f"HybridAdam sets {prefix}_bits through {prefix}_codec")
        if "bits" in kwargs:
            raise ValueError("HybridAdam sets bits through m_codec and v_codec")
        super().__init__(params, lr, betas, eps, weight_decay, bits=8, **kwargs)
        self.defaults.update(self._codec_defaults)
        for group in self.param_groups:
            for key, value in self._codec_defaults.items():
                group.setdefault(key, value)

    def _choice(self, group: dict, prefix: str):
        return group.get(f"{prefix}_codec", self._codec_defaults[f"{prefix}_codec"])

    def _moment_codec(self, group, prefix, p):
        choice = self._choice(group, prefix)
        if isinstance(choice, StateCodec):
            return choice
        if p is not None and (small(p, group) or (choice in ("factored", "lowrank") and p.dim() < 2)):
            return super()._moment_codec({**group, f"{prefix}_bits": 32}, prefix, p)
        if choice == "factored":
            return _FACTORED
        if choice == "lowrank":
            return _lowrank_codec({**self._codec_defaults, **group})
        return super()._moment_codec({**group, f"{prefix}_bits": M_CODECS[choice] if prefix == "m" else V_CODECS[choice]}, prefix, p)
