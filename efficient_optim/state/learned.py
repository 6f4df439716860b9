"""Block-wise quantized storage with a learned codebook per state tensor (protocol P6).

``LearnedQuantized(bits=4)`` stores a state like ``Quantized`` (uint8 codes, two per byte at 4 bits, one
absmax scale per block) but rounds the normalized values to a codebook of ``2**bits`` levels *fitted to that
tensor's own values* by k-means (``quant.kmeans.fit_codebook``), refitted on a schedule. The codebook is part
of the state: ``<name>.levels`` (float32, ``2**bits`` values: 64 bytes at 4 bits) beside ``<name>.codes`` and
``<name>.scales``, and ``<name>.encodes`` counts the encodes so the refit schedule resumes exactly. Every
tensor is plain, so ``state_dict()`` loads with ``torch.load(weights_only=True)`` and a resumed run refits
at the same steps with the same data: bit-identical trajectories.

Refit schedule: the first encode always fits. With ``refit_every = R > 0`` the codebook is refitted at encode
counts 1, 2, 4, 8, ... while they are below ``R`` (``doubling=True``, the default: the distribution of a fresh
moment changes fastest early), then at every multiple of ``R``. ``refit_every = 0`` fits once. Each refit
starts from the current codebook (a warm start), so levels move smoothly.

Codes written before a refit are decoded with the *new* levels only after they are re-encoded: a refit
happens inside ``encode`` on the value being stored, so stored codes and levels always match.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant import SCALE_DTYPES, get_map, num_blocks, packed_numel
from ..quant.blockwise import _per_element, block_absmax, check_finite, round_scale_up, validate_block_size
from ..quant.kmeans import FIT_SPACES, fit_codebook
from ..quant.maps import floor_index
from ..quant.packing import pack_codes, unpack_codes
from ..quant.rounding import ROUNDING_MODES, uniform_from_hash
from .codec import StateCodec

# initial levels before the first fit (never used to store anything: the first encode fits)
_INIT_MAPS = {True: "dynamic", False: "sqrt_nozero"}


def encode_to_levels(levels: torch.Tensor, u: torch.Tensor, rounding: str, salt: int = 0) -> torch.Tensor:
    """Codes (int64) of normalized values ``u`` for sorted ``levels``: nearest (ties up) or stochastic."""
    u = u.clamp(float(levels[0]), float(levels[-1])).contiguous()
    if rounding == "nearest":
        mids = (levels[:-1] + levels[1:]) * 0.5
        return torch.searchsorted(mids, u, right=True)
    lo = floor_index(levels, u)
    hi = (lo + 1).clamp(max=levels.numel() - 1)
    below = u - levels[lo]
    gap = levels[hi] - levels[lo]
    r = uniform_from_hash(u.numel(), salt, device=u.device).view_as(u)
    return torch.where(r * gap < below, hi, lo)


def refit_due(count: int, refit_every: int, doubling: bool) -> bool:
    """Whether the encode numbered ``count`` (0-based) refits the codebook."""
    if count == 0:
        return True
    if refit_every == 0:
        return False
    if count % refit_every == 0:
        return True
    return doubling and count < refit_every and (count & (count - 1)) == 0


@dataclass(frozen=True)
class LearnedQuantized(StateCodec):
    """Block-wise absmax quantization onto a k-means codebook fitted to the state's own values.

    Args:
        bits: 4 (default) or 8.
        block_size: elements per block (default 128 at 4 bits, 256 at 8 bits).
        signed: True (default) for momentum-like states, False for non-negative ones (no zero level).
        rounding: ``"nearest"`` (default) or ``"stochastic"``.
        scale_dtype: ``"bfloat16"`` (default) or ``"float32"``.
        refit_every: refit period in encodes (steps); 0 fits once at the first encode. Default 100.
        doubling: also refit at encodes 1, 2, 4, ... below ``refit_every`` (default True).
        space: k-means space: ``"identity"`` or ``"sqrt"``; ``None`` (default): identity for signed states,
            sqrt for unsigned ones.
        max_samples: values per fit (a quantile sketch of the tensor). Default 65536.
    """

    bits: int = 4
    block_size: int | None = None
    signed: bool = True
    rounding: str = "nearest"
    scale_dtype: str = "bfloat16"
    refit_every: int = 100
    doubling: bool = True
    space: str | None = None
    max_samples: int = 1 << 16

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"bits of a learned codebook state must be 4 or 8, got {self.bits!r}")
        if self.block_size is None:
            object.__setattr__(self, "block_size", 128 if self.bits == 4 else 256)
        validate_block_size(self.block_size, self.bits)
        if self.rounding not in ROUNDING_MODES:
            raise ValueError(f"rounding must be one of {ROUNDING_MODES}, got {self.rounding!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {sorted(SCALE_DTYPES)}, got {self.scale_dtype!r}")
        if not isinstance(self.refit_every, int) or isinstance(self.refit_every, bool) or self.refit_every < 0:
            raise ValueError(f"invalid refit_every: {self.refit_every!r} (must be an integer >= 0)")
        if self.space is None:
            object.__setattr__(self, "space", "identity" if self.signed else "sqrt")
        if self.space not in FIT_SPACES:
            raise ValueError(f"space must be one of {FIT_SPACES}, got {self.space!r}")
        if not isinstance(self.max_samples, int) or self.max_samples < 64:
            raise ValueError(f"invalid max_samples: {self.max_samples!r} (must be an integer >= 64)")

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    def describe(self, param=None) -> str:
        """``"4bit-learned"`` or ``"8bit-learned"``."""
        return f"{self.bits}bit-learned"

    @property
    def scale_block_size(self) -> int:
        return self.block_size

    def codebook(self, state, name):
        """The current levels of state ``name`` (a copy), as ``levels``."""
        return self.levels(state, name)

    def expected(self, name, param):
        n = param.numel()
        return {
            f"{name}.codes": ((packed_numel(n, self.bits),), torch.uint8),
            f"{name}.scales": ((num_blocks(n, self.block_size),), self.torch_scale_dtype),
            f"{name}.levels": ((2**self.bits,), torch.float32),
            f"{name}.encodes": ((), torch.int64),
        }

    def init(self, state, name, param):
        dev, n = param.device, param.numel()
        state[f"{name}.codes"] = torch.zeros(packed_numel(n, self.bits), dtype=torch.uint8, device=dev)
        state[f"{name}.scales"] = torch.zeros(num_blocks(n, self.block_size), dtype=self.torch_scale_dtype, device=dev)
        init = get_map(_INIT_MAPS[self.signed], self.bits, self.signed).levels
        levels = torch.ones(2**self.bits, dtype=torch.float32)
        levels[-init.numel() :] = init  # (the signed dynamic map may have one level fewer; pad below)
        for i in range(2**self.bits - init.numel() - 1, -1, -1):
            levels[i] = levels[i + 1] - 1e-3
        state[f"{name}.levels"] = levels.to(dev)
        state[f"{name}.encodes"] = torch.zeros((), dtype=torch.int64, device=dev)

    def decode(self, state, name, param):
        levels = state[f"{name}.levels"]
        idx = unpack_codes(state[f"{name}.codes"], self.bits, param.numel())
        flat = levels[idx] * _per_element(state[f"{name}.scales"], param.numel(), self.block_size)
        return flat.view(param.shape)

    def encode(self, state, name, value, *, salt=0):
        check_finite(value, "input")
        flat = value.reshape(-1).to(torch.float32)
        n = flat.numel()
        scales = round_scale_up(block_absmax(flat, self.block_size), self.torch_scale_dtype)
        s = scales.to(torch.float32)
        inv = torch.where(s > 0, 1.0 / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))
        u = flat * _per_element(inv, n, self.block_size)
        count_t = state[f"{name}.encodes"]
        count = int(count_t)
        levels = state[f"{name}.levels"]
        if refit_due(count, self.refit_every, self.doubling):
            fitted = fit_codebook(u, self.bits, self.signed, space=self.space, init=None if count == 0 else levels.cpu(),
                                  max_samples=self.max_samples)  # fmt: skip
            levels.copy_(fitted)
        codes = encode_to_levels(levels, u, self.rounding, salt)
        state[f"{name}.codes"].copy_(pack_codes(codes, self.bits))
        state[f"{name}.scales"].copy_(scales)
        count_t += 1

    def levels(self, state: dict, name: str) -> torch.Tensor:
        """The current codebook of state ``name`` (a copy)."""
        return state[f"{name}.levels"].clone()
