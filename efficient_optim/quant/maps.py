"""Quantization maps: the sorted codebook of levels a block-normalized value is rounded to.

Every map is a sorted float32 codebook of at most ``2**bits`` distinct levels in ``[-1, 1]`` (signed) or
``[0, 1]`` (unsigned). Encoding finds the level at or below the value (``floor index``) and then rounds to
it or the next level up, to the nearest or stochastically. Because every map is a codebook, the same
encoder serves linear, dynamic-exponent, companded and learned maps alike.

For the fused kernels each map also carries a *bucket table*: the float bit pattern of a normalized value
(sign, exponent, top ``lut_mantissa_bits`` of the mantissa) indexes a table holding the floor index at the
bucket's lower edge; the table is built so every bucket holds at most one level, so a single comparison
with the next level corrects it. This is exact (it reproduces ``searchsorted``), costs two small table
reads per element and needs no division, logarithm or rounding call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cache

import torch

MAP_NAMES = ("dynamic", "dynamic_nozero", "linear", "linear_nozero", "sqrt", "sqrt_nozero", "softsign", "learned")

# The bucket table spans |u| in [2**-exp_range, 1] (smaller values share the bottom bucket). Each map
# gets the smallest exponent window and mantissa width that keep one level per bucket, so the int32
# table (gathered with AVX2 in the kernel) stays within the L1 cache.
_MIN_EXP_RANGE, _MAX_EXP_RANGE = 4, 40
_MAX_LUT_MANTISSA_BITS = 12


@dataclass(frozen=True, eq=False)
class QuantMap:
    """A sorted codebook and its bucket table.

    Args:
        name: the map's name (one of ``MAP_NAMES``).
        bits: code width, 4 or 8.
        signed: whether the levels cover ``[-1, 1]`` (True) or ``[0, 1]`` (False).
        levels: sorted, distinct float32 levels; at most ``2**bits`` of them.
    """

    name: str
    bits: int
    signed: bool
    levels: torch.Tensor
    lut: torch.Tensor = field(init=False)
    lut_mantissa_bits: int = field(init=False)
    lut_exp_range: int = field(init=False)
    midpoints: torch.Tensor = field(init=False)
    mid_lut: torch.Tensor = field(init=False)
    mid_mantissa_bits: int = field(init=False)
    mid_exp_range: int = field(init=False)

    def __post_init__(self):
        levels = self.levels.to(torch.float32).contiguous()
        if levels.ndim != 1 or levels.numel() < 2 or levels.numel() > 2**self.bits:
            raise ValueError(f"map {self.name!r}: needs 2..{2**self.bits} levels, got {levels.numel()}")
        if not bool(torch.all(levels[1:] > levels[:-1])):
            raise ValueError(f"map {self.name!r}: levels must be sorted and distinct")
        if not bool(torch.isfinite(levels).all()) or levels.abs().max() > 1:
            raise ValueError(f"map {self.name!r}: levels must be finite and within [-1, 1]")
        object.__setattr__(self, "levels", levels)
        if not self.signed and levels[0] < 0:
            raise ValueError(f"map {self.name!r}: an unsigned map cannot have negative levels")
        try:
            lut, mbits, erange = _build_bucket_table(levels, self.signed, floor=True)
        except ValueError:
            raise ValueError(f"map {self.name!r}: {_closest_pair(levels)}") from None
        object.__setattr__(self, "lut", lut)
        object.__setattr__(self, "lut_mantissa_bits", mbits)
        object.__setattr__(self, "lut_exp_range", erange)
        # Nearest rounding = number of midpoints <= u. Midpoints are fp32, padded with +inf so the
        # kernel's one correction step never runs past the last level.
        mids = (levels[:-1] + levels[1:]) * 0.5
        mid_lut, mid_mbits, mid_erange = _build_bucket_table(mids, self.signed, floor=False)
        object.__setattr__(self, "midpoints", torch.cat([mids, torch.tensor([float("inf")])]).contiguous())
        object.__setattr__(self, "mid_lut", mid_lut)
        object.__setattr__(self, "mid_mantissa_bits", mid_mbits)
        object.__setattr__(self, "mid_exp_range", mid_erange)

    @property
    def num_levels(self) -> int:
        return self.levels.numel()

    @property
    def has_zero(self) -> bool:
        return bool((self.levels == 0).any())

    def tables(self) -> dict[str, torch.Tensor]:
        """Every tensor the map holds (shared by all states using it; counted once in memory figures)."""
        return {"levels": self.levels, "lut": self.lut, "midpoints": self.midpoints, "mid_lut": self.mid_lut}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tables().values())

    def __repr__(self) -> str:
        kind = "signed" if self.signed else "unsigned"
        return f"QuantMap({self.name!r}, bits={self.bits}, {kind}, levels={self.num_levels})"


def _closest_pair(levels: torch.Tensor) -> str:
    """Why a codebook cannot get a bucket table: its two closest levels (relative to their magnitude)."""
    lv = levels.to(torch.float64)
    gaps = (lv[1:] - lv[:-1]) / torch.maximum(lv[1:].abs(), lv[:-1].abs()).clamp_min(1e-300)
    i = int(gaps.argmin())
    return (f"levels {float(lv[i]):.8g} and {float(lv[i + 1]):.8g} are too close together (relative gap "
            f"{float(gaps[i]):.2g}); the encoder's bucket table separates levels whose relative gap is at least "
            f"about 2**-{_MAX_LUT_MANTISSA_BITS} = {2.0**-_MAX_LUT_MANTISSA_BITS:.2g}, and levels below "
            f"2**-{_MAX_EXP_RANGE} of the block maximum share one bucket: merge or space them further apart")


def _bucket_keys(u: torch.Tensor, mantissa_bits: int, exp_range: int, signed: bool) -> torch.Tensor:
    """Bucket index of each float32 value (sign | clamped exponent | top mantissa bits).

    Unsigned maps have only the positive half (``u`` is clamped to >= 0 and -0.0 made +0.0 first).
    """
    bits = u.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    sign = (bits >> 31) if signed else torch.zeros_like(bits)
    exp = (bits >> 23) & 0xFF
    mant = (bits & 0x7FFFFF) >> (23 - mantissa_bits)
    e_lo = 127 - exp_range
    tiny = exp < e_lo
    e_idx = torch.where(tiny, torch.zeros_like(exp), exp.clamp(max=127) - e_lo)
    mant = torch.where(tiny, torch.zeros_like(mant), mant)
    per_sign = (exp_range + 1) << mantissa_bits
    return sign * per_sign + (e_idx << mantissa_bits) + mant


def _bucket_counts(levels64: torch.Tensor, mbits: int, erange: int, signed: bool) -> torch.Tensor | None:
    """Number of levels <= each bucket's lower edge, or None if some bucket holds two or more levels."""
    e_idx = torch.arange(erange + 1, dtype=torch.float64).repeat_interleave(1 << mbits)
    mant = torch.arange(1 << mbits, dtype=torch.float64).repeat(erange + 1)
    scale = torch.pow(2.0, e_idx - erange)
    lo = scale * (1 + mant / (1 << mbits))
    hi = scale * (1 + (mant + 1) / (1 << mbits))
    lo[0] = 0.0  # the bottom bucket also holds every tiny value and zero
    # positive buckets cover [lo, hi); negative buckets cover (-hi, -lo]
    halves = [(lo, hi)] + ([(-hi, -lo)] if signed else [])
    tables = []
    for start, end in halves:
        first = torch.searchsorted(levels64, start, right=True)
        inside = torch.searchsorted(levels64, end, right=True) - first
        if bool((inside > 1).any()):
            return None
        tables.append(first)
    return torch.cat(tables)


def _build_bucket_table(levels: torch.Tensor, signed: bool, floor: bool) -> tuple[torch.Tensor, int, int]:
    """Smallest (table size) mantissa width and exponent window whose buckets each hold <= 1 level.

    The table holds the floor index at each bucket's lower edge (``floor=True``) or the count of
    values <= that edge (``floor=False``, for midpoints)."""
    lv = levels.to(torch.float64)
    best = None
    for mbits in range(2, _MAX_LUT_MANTISSA_BITS + 1):
        for erange in range(_MIN_EXP_RANGE, _MAX_EXP_RANGE + 1):
            size = (erange + 1) << mbits
            if best is not None and size >= best[0]:
                break
            table = _bucket_counts(lv, mbits, erange, signed)
            if table is not None:
                best = (size, table, mbits, erange)
                break
    if best is None:
        raise ValueError("levels are too close together for the bucket table; space them further apart")
    _, table, mbits, erange = best
    if floor:
        table = (table - 1).clamp(min=0)
    return table.to(torch.int32).contiguous(), mbits, erange


def floor_index(levels: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Largest index i with ``levels[i] <= u`` (values are assumed clamped to the levels' range)."""
    return (torch.searchsorted(levels, u.contiguous(), right=True) - 1).clamp_(min=0)


def nearest_index(qmap: QuantMap, u: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level (ties round up): the number of midpoints <= u."""
    return torch.searchsorted(qmap.midpoints[:-1].to(u.device), u.contiguous(), right=True)


def nearest_index_by_table(qmap: QuantMap, u: torch.Tensor) -> torch.Tensor:
    """The same as ``nearest_index`` through the midpoint bucket table (the fused kernel's algorithm)."""
    if not qmap.signed:
        u = u.clamp(min=0) + 0.0
    keys = _bucket_keys(u, qmap.mid_mantissa_bits, qmap.mid_exp_range, qmap.signed)
    cnt = qmap.mid_lut.to(torch.int64)[keys]
    return cnt + (qmap.midpoints[cnt] <= u).to(torch.int64)


def floor_index_by_table(qmap: QuantMap, u: torch.Tensor) -> torch.Tensor:
    """The same as ``floor_index`` through the bucket table: the algorithm the fused kernels use."""
    if not qmap.signed:
        u = u.clamp(min=0) + 0.0
    keys = _bucket_keys(u, qmap.lut_mantissa_bits, qmap.lut_exp_range, qmap.signed)
    idx = qmap.lut.to(torch.int64)[keys]
    nxt = (idx + 1).clamp(max=qmap.num_levels - 1)
    return torch.where((nxt > idx) & (qmap.levels[nxt] <= u), nxt, idx)


# --------------------------------------------------------------------------------------------- builders


def _dynamic_levels(bits: int, signed: bool) -> list[float]:
    """Dynamic-exponent levels: decades 10**-k, each with linearly spaced fractions in [0.1, 1].

    The largest decade gets the most fraction levels (2**(i+f) for decade i), the scheme bitsandbytes
    uses for its 8-bit optimizers: relative precision stays roughly even from 1e-(bits-2) to 1.
    """
    exponent_levels = bits - 1
    fraction_bits = bits - 1 - exponent_levels if signed else bits - exponent_levels
    out = {0.0, 1.0}
    for i in range(exponent_levels):
        n = 2 ** (i + fraction_bits)
        decade = 10.0 ** (i - (exponent_levels - 1))
        edges = [0.1 + 0.9 * k / n for k in range(n + 1)]
        for k in range(n):
            val = decade * (edges[k] + edges[k + 1]) / 2
            out.add(val)
            if signed:
                out.add(-val)
    if signed:
        out.add(-1.0)
    vals = sorted(out)
    # Signed maps overshoot by one (both endpoints and zero): drop the smallest-magnitude negative level,
    # so the block maximum of either sign stays exact.
    while len(vals) > 2**bits:
        vals.remove(max(v for v in vals if v < 0))
    return vals


def _dynamic_nozero_levels(bits: int, signed: bool) -> list[float]:
    """The dynamic map without a zero level, so a nonzero state never decodes to exactly zero.

    Meant for the second moment: with a zero level, a coordinate whose v is below half the smallest
    positive level (~3e-7 of its block's maximum at 8 bits) is stored as 0 while its m is not, and its
    update becomes ``lr * m / eps`` -- thousands of times too large. Unsigned: the zero level is replaced
    by the dynamic pattern continued one decade down (one level, at ``0.55 * 10**-(bits-1)``), so tiny
    values are stored slightly too large, which only shrinks their updates. Signed: the map is made
    symmetric (the smallest-magnitude negative level that ``dynamic`` drops is kept) and has no zero.
    """
    exponent_levels = bits - 1
    vals = [v for v in _dynamic_levels(bits, signed) if v != 0.0]
    if signed:
        smallest = min(v for v in vals if v > 0)
        vals.append(-smallest)
    else:
        vals.append(0.55 * 10.0**-exponent_levels)
    return sorted(vals)


def _linear_levels(bits: int, signed: bool) -> list[float]:
    if signed:  # symmetric, with an exact zero: 2**bits - 1 levels
        half = 2 ** (bits - 1) - 1
        return [k / half for k in range(-half, half + 1)]
    n = 2**bits - 1
    return [k / n for k in range(n + 1)]


def _linear_nozero_levels(bits: int, signed: bool) -> list[float]:
    """Linear levels with no zero level: the smallest magnitude is 1/2**bits (unsigned)."""
    if signed:
        half = 2 ** (bits - 1)
        pos = [(k + 0.5) / (half - 0.5) for k in range(half)]
        pos = [p / pos[-1] for p in pos]
        return [-p for p in reversed(pos)] + pos
    n = 2**bits
    return [(k + 1) / n for k in range(n)]


def _sqrt_nozero_levels(bits: int, signed: bool) -> list[float]:
    """Zero-free levels evenly spaced in sqrt(|u|): u = ((k + 1) / 2**bits)**2 (unsigned).

    Meant for the second moment: storing sqrt(v) on a linear grid (as FlashOptim stores v) keeps 16x the
    low-end resolution of ``linear_nozero`` at 4 bits (smallest level 1/256 instead of 1/16), with no zero.
    """
    return [math.copysign(p * p, p) for p in _linear_nozero_levels(bits, signed)]


def _sqrt_levels(bits: int, signed: bool) -> list[float]:
    """Levels evenly spaced in sqrt(|u|), with an exact zero: u = sign(j) * (j / h)**2 for j = -h..h,
    h = 2**(bits - 1) - 1 (signed; 255 levels at 8 bits), or j = 0..2**bits - 1 over h = 2**bits - 1 (unsigned).

    Computed in fp32 as ``(j * |j|) * c`` with ``c = 1 / h**2`` rounded to fp32 (clamped to [-1, 1]): the
    fused CPU kernel recomputes exactly these values, so it encodes and decodes this map with arithmetic
    instead of table reads (``kernels/cpu_maps.h``). Fine steps near zero (the smallest magnitude is 1/h**2,
    6.2e-5 at 8 bits) and coarse ones near the block maximum, like the ``sqrt_nozero`` map of the second moment.
    """
    h = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    j = torch.arange(-h if signed else 0, h + 1, dtype=torch.float32)
    c = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(float(h * h), dtype=torch.float32)
    return ((j * j.abs()) * c).clamp(-1.0, 1.0).tolist()


def _softsign_levels(bits: int, signed: bool) -> list[float]:
    """Companded levels: linear in y = 2u / (1 + |u|), so small magnitudes get finer steps.

    Decoding a linear level y gives u = y / (2 - |y|) (the inverse of the compander).
    """
    lin = _linear_levels(bits, signed)
    return [y / (2.0 - abs(y)) for y in lin]


_BUILDERS = {
    "dynamic": _dynamic_levels,
    "dynamic_nozero": _dynamic_nozero_levels,
    "linear": _linear_levels,
    "linear_nozero": _linear_nozero_levels,
    "sqrt_nozero": _sqrt_nozero_levels,
    "sqrt": _sqrt_levels,
    "softsign": _softsign_levels,
}


@cache
def get_map(name: str, bits: int, signed: bool) -> QuantMap:
    """The shared built-in map ``name`` at ``bits`` bits (one object per configuration, cached).

    Args:
        name: ``dynamic``, ``dynamic_nozero``, ``linear``, ``linear_nozero``, ``sqrt``, ``sqrt_nozero`` or
            ``softsign``. ``learned`` maps are fitted to data with ``learned_map`` instead.
        bits: 4 or 8.
        signed: True for states that change sign (momentum), False for non-negative ones (variance).
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8 for a quantization map, got {bits}")
    if name not in _BUILDERS:
        if name == "learned":
            raise ValueError("a 'learned' map is fitted to data: build it with learned_map(values, bits, signed)")
        raise ValueError(f"unknown quantization map {name!r}; choose one of {sorted(_BUILDERS)}")
    levels = torch.tensor(_BUILDERS[name](bits, signed), dtype=torch.float64).to(torch.float32)
    return QuantMap(name, bits, signed, torch.unique(levels))


def learned_map(levels, bits: int, signed: bool) -> QuantMap:
    """A map from a learned codebook (e.g. k-means centroids of observed normalized state values).

    Args:
        levels: iterable or tensor of at most ``2**bits`` values in ``[-1, 1]``; sorted and deduplicated
            here. The extreme magnitude should be 1 so block maxima stay representable.
        bits: 4 or 8.
        signed: whether the state takes negative values.
    """
    t = torch.unique(torch.as_tensor(levels, dtype=torch.float32).flatten())
    if not math.isclose(float(t.abs().max()), 1.0, rel_tol=0, abs_tol=1e-6):
        raise ValueError("a learned map must reach magnitude 1 (block maxima map to it)")
    return QuantMap("learned", bits, signed, t)
