"""Dense storage: the state as a plain tensor of a float dtype (fp32, or bf16/fp16 to halve it)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant.rounding import ROUNDING_MODES, uniform_from_hash
from .codec import StateCodec

DENSE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def round_to_bf16_stochastic(x: torch.Tensor, salt: int) -> torch.Tensor:
    """fp32 -> bf16 with stochastic rounding: add a uniform 16-bit number below the kept bits, truncate."""
    bits = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    r = (uniform_from_hash(x.numel(), salt, device=x.device).view_as(x) * 65536).to(torch.int64)
    finite = torch.isfinite(x)
    rounded = ((bits + r) & 0xFFFF0000)
    # never round a finite value up to inf
    rounded = torch.where(finite & ((rounded & 0x7F800000) == 0x7F800000), bits & 0xFFFF0000, rounded)
    out = torch.where(finite, rounded, bits)
    out = torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)
    return out.view(torch.float32).to(torch.bfloat16)


@dataclass(frozen=True)
class Dense(StateCodec):
    """A dense state.

    Args:
        dtype: storage dtype, ``torch.float32`` (default), ``torch.bfloat16``, ``torch.float16``, or
            ``torch.float64`` (the full-precision state of a float64 parameter, as ``torch.optim`` keeps it).
        rounding: ``"nearest"`` (default) or ``"stochastic"`` (bf16 only) when storing below fp32.
    """

    dtype: torch.dtype = torch.float32
    rounding: str = "nearest"

    def __post_init__(self):
        if self.dtype not in DENSE_DTYPES:
            raise ValueError(f"Dense dtype must be one of {DENSE_DTYPES}, got {self.dtype}")
        if self.rounding not in ROUNDING_MODES:
            raise ValueError(f"rounding must be one of {ROUNDING_MODES}, got {self.rounding!r}")
        if self.rounding == "stochastic" and self.dtype != torch.bfloat16:
            raise ValueError("stochastic rounding of a dense state is supported for bfloat16 only")

    @property
    def is_dense_fp32(self) -> bool:
        return self.dtype == torch.float32

    @property
    def kernel_kind(self) -> str:
        return f"dense_{str(self.dtype).removeprefix('torch.')}"

    def kernel_operands(self, state, name) -> tuple:
        """``(tensor,)``: the state itself, updated in place by a fused kernel (``torch._fused_adamw_``)."""
        return (state[name],)

    @property
    def error_kind(self) -> str:
        """``"none"`` at fp32/fp64 (the parameter's full precision), ``"quantization"`` at bf16/fp16."""
        return "none" if self.dtype in (torch.float32, torch.float64) else "quantization"

    def describe(self, param=None) -> str:
        """``"fp32"``, ``"bf16"``, ``"float16"`` or ``"float64"``."""
        return str(self.dtype).replace("torch.", "").replace("float32", "fp32").replace("bfloat16", "bf16")

    @property
    def is_elementwise(self) -> bool:
        return True

    def for_dtensor(self, param):
        """A DTensor state with the parameter's placements (``sharded.ShardedDense``)."""
        from .sharded import ShardedDense

        return ShardedDense(self)

    def init(self, state, name, param):
        state[name] = torch.zeros_like(param, dtype=self.dtype, memory_format=torch.preserve_format)

    def decode(self, state, name, param):
        t = state[name]
        return t if t.dtype in (torch.float32, torch.float64) else t.to(torch.float32)

    def encode(self, state, name, value, *, salt=0):
        t = state[name]
        if value is t:
            return
        if self.rounding == "stochastic":
            t.copy_(round_to_bf16_stochastic(value, salt))
        else:
            t.copy_(value)

    def expected(self, name, param):
        return {name: (tuple(param.shape), self.dtype)}
