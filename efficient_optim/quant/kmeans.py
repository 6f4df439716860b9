"""Learned quantization levels: a 1-D k-means (Lloyd-Max) codebook fitted to observed normalized values.

``fit_codebook(u, bits, signed)`` returns ``2**bits`` sorted, distinct float32 levels in ``[-1, 1]``
(``[0, 1]`` unsigned) that minimize the squared rounding error of the sample ``u`` (values already divided
by their block's absolute maximum). The extreme magnitudes are pinned (``-1`` and ``+1`` signed, ``+1``
unsigned) so every block maximum stays exact, as for the built-in maps.

``space="sqrt"`` clusters ``sign(u) sqrt(|u|)`` instead of ``u`` and squares the centres back: the error
is then balanced in the square root of the value, which is what an Adam update divides by (the reason the
built-in ``sqrt_nozero`` v map is spaced that way). Unsigned fits ignore exact zeros, so a learned v map
never has a zero level (a zero level in a 4-bit v map makes updates blow up; see docs/characterization.md).

The fit is deterministic (sorted quantile sample, quantile or given initialization, a fixed number of
Lloyd iterations), so a run that refits its codebooks resumes bit-identically.
"""

from __future__ import annotations

import torch

FIT_SPACES = ("identity", "sqrt")
_MIN_POSITIVE = 1e-30  # floor of an unsigned level (levels are fitted to positive values only: never hit in practice)


def _to_space(x: torch.Tensor, space: str) -> torch.Tensor:
    return x if space == "identity" else torch.sign(x) * x.abs().sqrt()


def _from_space(x: torch.Tensor, space: str) -> torch.Tensor:
    return x if space == "identity" else torch.sign(x) * x * x


def quantile_sample(values: torch.Tensor, max_samples: int) -> torch.Tensor:
    """Sorted sample of at most ``max_samples`` values at evenly spaced ranks (an exact quantile sketch)."""
    x = torch.sort(values.reshape(-1).to(torch.float32)).values
    n = x.numel()
    if n <= max_samples:
        return x
    idx = torch.linspace(0, n - 1, max_samples, dtype=torch.float64).round().to(torch.int64)
    return x[idx]


def _pinned(signed: bool) -> torch.Tensor:
    return torch.tensor([-1.0, 1.0] if signed else [1.0], dtype=torch.float32)


def fit_codebook(
    values: torch.Tensor,
    bits: int,
    signed: bool,
    *,
    space: str = "identity",
    init: torch.Tensor | None = None,
    iters: int = 30,
    max_samples: int = 1 << 16,
) -> torch.Tensor:
    """K-means levels for normalized values.

    Args:
        values: normalized values (any shape; clamped to ``[-1, 1]`` / ``[0, 1]``; NaN/Inf are dropped).
        bits: code width; ``2**bits`` levels are returned (2 <= bits <= 8).
        signed: whether the levels cover ``[-1, 1]`` (True) or ``[0, 1]`` (False, no zero level).
        space: ``"identity"`` (squared error of ``u``) or ``"sqrt"`` (squared error of ``sqrt|u|``).
        init: starting levels (e.g. the previous fit, for a warm start); ``None``: quantiles of the sample.
        iters: Lloyd iterations (stops early once no centre moves).
        max_samples: values used for the fit (a quantile sketch of all of them).

    Returns:
        float32 tensor of ``2**bits`` sorted, distinct levels including the pinned extremes.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bits of a learned codebook must be in 2..8, got {bits}")
    if space not in FIT_SPACES:
        raise ValueError(f"space must be one of {FIT_SPACES}, got {space!r}")
    k = 2**bits
    x = values.reshape(-1).to(torch.float32)
    x = x[torch.isfinite(x)]
    x = x.clamp(-1.0, 1.0) if signed else x.clamp(0.0, 1.0)
    if not signed:
        x = x[x > 0]
    pinned_t = _to_space(_pinned(signed), space)
    k_free = k - pinned_t.numel()
    if x.numel() == 0:  # nothing to learn from: evenly spaced levels
        t = torch.linspace(-1.0 if signed else 0.0, 1.0, k + (0 if signed else 1))[0 if signed else 1 :]
        return _finish(t.to(torch.float32), pinned_t, space, signed, k)
    t = _to_space(quantile_sample(x, max_samples), space)
    if init is not None:
        centres = _to_space(init.to(torch.float32).flatten(), space)
        centres = centres[(centres - pinned_t.view(-1, 1)).abs().min(dim=0).values > 0]
        if centres.numel() != k_free:
            centres = None
    else:
        centres = None
    if centres is None:
        q = (torch.arange(k_free, dtype=torch.float64) + 0.5) / k_free
        centres = torch.quantile(t.to(torch.float64), q).to(torch.float32)
    for _ in range(iters):
        allc, order = torch.sort(torch.cat([centres, pinned_t]))
        is_free = order < k_free
        mids = (allc[:-1] + allc[1:]) * 0.5
        assign = torch.searchsorted(mids, t.contiguous(), right=True)
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, assign, t.to(torch.float64))
        counts = torch.zeros(k, dtype=torch.float64).index_add_(0, assign, torch.ones_like(t, dtype=torch.float64))
        new_all = torch.where(counts > 0, sums / counts.clamp(min=1), allc.to(torch.float64)).to(torch.float32)
        new_centres = new_all[is_free]
        moved = float((new_centres - allc[is_free]).abs().max()) if k_free else 0.0
        centres = new_centres
        if moved == 0.0:
            break
    return _finish(centres, pinned_t, space, signed, k)


def _finish(centres_t: torch.Tensor, pinned_t: torch.Tensor, space: str, signed: bool, k: int) -> torch.Tensor:
    """Back to value space, sorted, exactly ``k`` strictly increasing float32 levels, extremes pinned.

    Levels that coincide (empty or merged clusters) are nudged apart by one float32 ulp, bottom up, so
    tiny levels of a wide-range state (v spans many decades) keep their values."""
    levels = _from_space(torch.cat([centres_t, pinned_t]), space).to(torch.float32)
    lo = -1.0 if signed else _MIN_POSITIVE
    levels = torch.sort(levels.clamp(lo, 1.0)).values
    inf = torch.tensor(float("inf"))
    out = levels.clone()
    if signed:
        out[0] = -1.0
    for i in range(1, k):
        if out[i] <= out[i - 1]:
            out[i] = torch.nextafter(out[i - 1], inf)
    out[-1] = 1.0
    for i in range(k - 2, -1, -1):  # only if the bottom-up pass reached the top
        if out[i] >= out[i + 1]:
            out[i] = torch.nextafter(out[i + 1], -inf)
    return out


def codebook_mse(levels: torch.Tensor, values: torch.Tensor) -> float:
    """Mean squared error of rounding ``values`` to the nearest of ``levels`` (sorted)."""
    mids = (levels[:-1] + levels[1:]) * 0.5
    idx = torch.searchsorted(mids, values.reshape(-1).contiguous().to(torch.float32), right=True)
    return float(((levels[idx] - values.reshape(-1)) ** 2).mean())
