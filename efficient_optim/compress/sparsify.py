"""Sparsification: keep a fraction of a gradient's entries, by magnitude (top-k) or at random.

``TopK`` keeps the ``k = ceil(fraction * n)`` largest-magnitude entries, found with DGC's sampled threshold
(Lin et al., 2018): the threshold is read off a random sample of ``|g|`` (about 1 %), every entry above it
becomes a candidate, and the exact top-k is taken among the candidates only. The threshold is set low
enough (``oversample`` x k expected candidates) that the candidates almost always hold all k; when they do
not, the exact top-k over the whole tensor is taken (``fallbacks`` counts it). Either way the result *is*
the exact top-k, so the payload always holds exactly k entries: ``int32`` indices + the kept values.

``RandomK`` keeps k entries chosen at random from the salt (the random-dropping baseline of the
GradDrop / random-k literature). The indices are not sent: the receiver regenerates them from the 8-byte
seed in the payload, so the payload is the k values + 8 bytes. ``rescale=True`` multiplies the kept values
by n / k, which makes the estimate unbiased (useful without error feedback).

Both store the kept values through another compressor (``values=``, default float32), so e.g.
``TopK(0.01, values=Quantize(8))`` sends 8-bit values: the composition is the design.
"""

from __future__ import annotations

import math

import torch

from ..quant import uniform_from_hash
from ..quant.rounding import mix_salt
from .base import Compressor, Layout, Payload, check_fraction, kept_count
from .quantize import Quantize

_SAMPLE_SALT = 0x5A
_MAX_INT32_NUMEL = 2**31 - 1


def _values_compressor(values) -> Compressor:
    if values is None:
        return Quantize(32)
    if not isinstance(values, Compressor):
        raise ValueError(f"values must be a Compressor (e.g. Quantize(8)), got {values!r}")
    return values


class _Sparsifier(Compressor):
    """What ``TopK`` and ``RandomK`` share: k of a fraction, values through an inner compressor."""

    def __init__(self, fraction: float, values: Compressor | None):
        self.fraction = check_fraction(fraction)
        self.values = _values_compressor(values)

    def k(self, numel: int) -> int:
        """Entries kept of a tensor of ``numel`` elements."""
        return kept_count(numel, self.fraction)

    def _values_layout(self, k: int) -> Layout:
        return {f"values.{name}": spec for name, spec in self.values.layout(k).items()}

    def _pack_values(self, vals: torch.Tensor, salt: int) -> dict[str, torch.Tensor]:
        inner = self.values.compress(vals, salt=mix_salt(salt, 0x7A))
        return {f"values.{name}": t for name, t in inner.tensors.items()}

    def _unpack_values(self, tensors: dict[str, torch.Tensor], k: int) -> torch.Tensor:
        inner = {name[len("values."):]: t for name, t in tensors.items() if name.startswith("values.")}
        return self.values.decompress(Payload(torch.Size((k,)), inner))


class TopK(_Sparsifier):
    """Keep the largest-magnitude ``fraction`` of the entries (see the module doc).

    Args:
        fraction: the kept fraction of entries, in (0, 1] (``k = ceil(fraction * n)``, at least 1).
        values: how the kept values are stored (a ``Compressor``; default ``Quantize(32)``, float32).
        sample_fraction: fraction of the entries sampled to set the threshold (default 0.01).
        min_sample: smallest sample (default 1024); a tensor not larger than 4x this takes the exact top-k.
        oversample: expected candidates per kept entry (default 2.0; >= 1).
    """

    def __init__(self, fraction: float, values: Compressor | None = None, sample_fraction: float = 0.01,
                 min_sample: int = 1024, oversample: float = 2.0):  # fmt: skip
        super().__init__(fraction, values)
        self.sample_fraction = check_fraction(sample_fraction, "sample_fraction")
        if isinstance(min_sample, bool) or not isinstance(min_sample, int) or min_sample < 1:
            raise ValueError(f"min_sample must be an integer >= 1, got {min_sample!r}")
        if isinstance(oversample, bool) or not isinstance(oversample, (int, float)) or oversample < 1:
            raise ValueError(f"oversample must be a number >= 1, got {oversample!r}")
        self.min_sample, self.oversample = min_sample, float(oversample)
        self.fallbacks = 0  # compressions whose sampled threshold kept fewer than k candidates

    def __repr__(self) -> str:
        return f"TopK({self.fraction}, values={self.values!r})"

    def describe(self) -> str:
        inner = "" if isinstance(self.values, Quantize) and self.values.bits == 32 else f"/{self.values.describe()}"
        return f"top{100 * self.fraction:g}%{inner}"

    def layout(self, numel: int) -> Layout:
        k = self.k(numel)
        return {"indices": ((k,), torch.int32), **self._values_layout(k)}

    def select(self, flat: torch.Tensor, salt: int) -> torch.Tensor:
        """Sorted int64 indices of the ``k`` largest ``|flat|`` (exact; the threshold is sampled)."""
        n = flat.numel()
        k = self.k(n)
        if n > _MAX_INT32_NUMEL:
            raise ValueError(f"TopK stores int32 indices: a tensor of {n} elements is too large; split it")
        mag = flat.abs()
        samples = max(self.min_sample, math.ceil(self.sample_fraction * n))
        if k == n or n <= 4 * samples:
            return torch.topk(mag, k, sorted=False).indices.sort().values
        where = (uniform_from_hash(samples, mix_salt(salt, _SAMPLE_SALT), device=flat.device) * n).long()
        sample = mag[where.clamp_(max=n - 1)]
        keep_in_sample = min(samples, max(1, math.ceil(self.oversample * k / n * samples)))
        threshold = torch.topk(sample, keep_in_sample, sorted=False).values.min()
        candidates = torch.nonzero(mag >= threshold).flatten()
        if candidates.numel() < k:
            self.fallbacks += 1
            return torch.topk(mag, k, sorted=False).indices.sort().values
        best = torch.topk(mag[candidates], k, sorted=False).indices
        return candidates[best].sort().values

    def _compress(self, flat: torch.Tensor, salt: int) -> dict[str, torch.Tensor]:
        idx = self.select(flat, salt)
        return {"indices": idx.to(torch.int32), **self._pack_values(flat[idx], salt)}

    def _decompress(self, tensors: dict[str, torch.Tensor], numel: int) -> torch.Tensor:
        idx = tensors["indices"].to(torch.int64)
        out = torch.zeros(numel, dtype=torch.float32, device=idx.device)
        return out.index_copy_(0, idx, self._unpack_values(tensors, idx.numel()))


class RandomK(_Sparsifier):
    """Keep ``fraction`` of the entries, chosen at random from the salt (see the module doc).

    Args:
        fraction: the kept fraction of entries, in (0, 1] (``k = ceil(fraction * n)``, at least 1).
        values: how the kept values are stored (a ``Compressor``; default ``Quantize(32)``, float32).
        rescale: multiply the kept values by ``n / k`` so the estimate is unbiased (default True; use False
            under error feedback, which corrects the bias itself).

    The chosen entries depend only on ``(salt, n)``: pass a different salt at every call (the feedback
    wrappers do), or the same entries are dropped every time.
    """

    def __init__(self, fraction: float, values: Compressor | None = None, rescale: bool = True):
        super().__init__(fraction, values)
        self.rescale = bool(rescale)

    def __repr__(self) -> str:
        return f"RandomK({self.fraction}, values={self.values!r}, rescale={self.rescale})"

    def describe(self) -> str:
        return f"rand{100 * self.fraction:g}%"

    def layout(self, numel: int) -> Layout:
        return {"seed": ((1,), torch.int64), **self._values_layout(self.k(numel))}

    @staticmethod
    def indices(numel: int, k: int, seed: int, device=None) -> torch.Tensor:
        """The sorted indices of the ``k`` entries kept of ``numel`` under ``seed`` (unique keys: no ties)."""
        if numel == 0:
            return torch.zeros(0, dtype=torch.int64, device=device)
        draw = (uniform_from_hash(numel, seed, device=device) * (1 << 24)).to(torch.int64)
        keys = draw * numel + torch.arange(numel, dtype=torch.int64, device=device)
        return torch.topk(keys, k, largest=False, sorted=False).indices.sort().values

    def _compress(self, flat: torch.Tensor, salt: int) -> dict[str, torch.Tensor]:
        n = flat.numel()
        k = self.k(n)
        idx = self.indices(n, k, salt, flat.device)
        vals = flat[idx] * (n / k) if self.rescale and k else flat[idx]
        seed = torch.tensor([salt & 0xFFFFFFFF], dtype=torch.int64, device=flat.device)
        return {"seed": seed, **self._pack_values(vals, salt)}

    def _decompress(self, tensors: dict[str, torch.Tensor], numel: int) -> torch.Tensor:
        k = self.k(numel)
        seed = tensors["seed"]
        idx = self.indices(numel, k, int(seed[0]), seed.device)
        out = torch.zeros(numel, dtype=torch.float32, device=seed.device)
        return out.index_copy_(0, idx, self._unpack_values(tensors, k))
