"""Statistics of one state tensor, of its error against an exact copy, of its rank, and of error growth.

Definitions (the tests compare each against a direct computation):

- ``mean``, ``std``: over all elements; ``std`` is the population standard deviation (divide by n).
- ``kurtosis``: Pearson's, ``E[(x - mean)^4] / std^4`` (3 for a Gaussian; ``None`` when ``std == 0``).
- ``absmax_over_std``: ``max|x| / std``: how far the largest value sits in the tail (about 4-5 for a
  Gaussian tensor of 10^4-10^6 elements; block-wise quantization spends its levels up to this).
- ``outlier_frac``: fraction of elements with ``|x - mean| > outlier_sigma * std`` (default 6 sigma:
  2e-9 for a Gaussian, so anything measurable is a heavy tail).
- ``zero_frac``: fraction of exact zeros (a 4-bit map with a zero level flushes small values to it).
- log-magnitude histogram: counts of ``log10|x|`` in ``HIST_EDGES`` (quarter decades from 1e-12 to 1e2,
  values outside clamped into the end bins), plus the exact zeros counted apart.
- error of a stored state ``q`` against the exact state ``s``: relative L2 ``||q - s|| / ||s||``, largest
  absolute error, largest absolute error over ``max|s|``, and per block of ``block_size`` elements the
  relative L2 error of each block (max, 99th percentile, mean over blocks with ``||s_b|| > 0``);
  ``flushed_frac``: fraction of elements stored as exactly 0 while the exact value is not.
- effective rank (Roy & Vetterli): ``exp(-sum p_i log p_i)`` with ``p_i = sigma_i / sum sigma``; rank-r
  reconstruction error: ``sqrt(sum_{i>r} sigma_i^2) / ||M||_F`` (the best rank-r approximation's).
- growth exponent: least-squares slope ``alpha`` of ``log(error)`` on ``log(step)``: ``alpha ~ 1`` linear
  growth, ``0 < alpha < 1`` sub-linear, ``alpha ~ 0`` bounded.
"""

from __future__ import annotations

import math

import torch

HIST_EDGES = [round(-12.0 + 0.25 * i, 2) for i in range(57)]  # log10|x| bin edges, 56 bins


def tensor_stats(x: torch.Tensor, outlier_sigma: float = 6.0) -> dict:
    """Moments and tail statistics of ``x`` (any shape, read as float64 for the moments)."""
    t = x.detach().reshape(-1).to(torch.float64)
    n = t.numel()
    if n == 0:
        return {"numel": 0}
    mean = float(t.mean())
    c = t - mean
    var = float((c * c).mean())
    std = math.sqrt(var)
    absmax = float(t.abs().max())
    out = {
        "numel": n,
        "mean": mean,
        "std": std,
        "rms": math.sqrt(float((t * t).mean())),
        "absmax": absmax,
        "kurtosis": float((c**4).mean()) / (var * var) if var > 0 else None,
        "absmax_over_std": absmax / std if std > 0 else None,
        "outlier_frac": float((c.abs() > outlier_sigma * std).to(torch.float64).mean()) if std > 0 else 0.0,
        "zero_frac": float((t == 0).to(torch.float64).mean()),
    }
    return out


def log_histogram(x: torch.Tensor, edges: list[float] = HIST_EDGES) -> tuple[list[int], int]:
    """Counts of ``log10|x|`` per bin of ``edges`` (out-of-range values clamped into the end bins) and the
    number of exact zeros (not in the bins)."""
    t = x.detach().reshape(-1).to(torch.float32).abs()
    nz = t[t > 0]
    zeros = t.numel() - nz.numel()
    lo, hi, nb = edges[0], edges[-1], len(edges) - 1
    logs = torch.log10(nz).clamp(lo, hi - 1e-6)
    counts = torch.histc(logs, bins=nb, min=lo, max=hi) if nz.numel() else torch.zeros(nb)
    return [int(c) for c in counts.tolist()], int(zeros)


def top_positions(x: torch.Tensor, frac: float) -> torch.Tensor:
    """Sorted flat indices of the ``max(1, round(frac * n))`` largest-magnitude elements."""
    t = x.detach().reshape(-1).abs()
    k = max(1, int(round(frac * t.numel())))
    return torch.sort(torch.topk(t, min(k, t.numel())).indices).values


def overlap(current: torch.Tensor, previous: torch.Tensor) -> float:
    """Fraction of ``current`` (sorted indices) that is also in ``previous``."""
    if current.numel() == 0:
        return 0.0
    return float(torch.isin(current, previous).to(torch.float64).mean())


def error_stats(stored: torch.Tensor, exact: torch.Tensor, block_size: int = 256) -> dict:
    """Error of ``stored`` against ``exact`` (same shape): relative L2, max, per block, flushed zeros."""
    q = stored.detach().reshape(-1).to(torch.float64)
    s = exact.detach().reshape(-1).to(torch.float64)
    d = q - s
    s_norm = float(s.norm())
    d_norm = float(d.norm())
    s_max = float(s.abs().max()) if s.numel() else 0.0
    out = {
        "err_l2": d_norm,
        "err_rel_l2": d_norm / s_norm if s_norm > 0 else None,
        "err_max_abs": float(d.abs().max()) if d.numel() else 0.0,
        "err_max_over_absmax": float(d.abs().max()) / s_max if s_max > 0 else None,
        "flushed_frac": float(((q == 0) & (s != 0)).to(torch.float64).mean()) if q.numel() else 0.0,
    }
    n = s.numel()
    nb = (n + block_size - 1) // block_size
    pad = nb * block_size - n
    if nb:
        sb = torch.cat([s, s.new_zeros(pad)]).view(nb, block_size).norm(dim=1)
        db = torch.cat([d, d.new_zeros(pad)]).view(nb, block_size).norm(dim=1)
        ok = sb > 0
        rel = db[ok] / sb[ok]
        if rel.numel():
            out["block_err_max"] = float(rel.max())
            out["block_err_p99"] = float(torch.quantile(rel, 0.99))
            out["block_err_mean"] = float(rel.mean())
    return out


def singular_values(m: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(m.detach().to(torch.float64).reshape(m.shape[0], -1))


def effective_rank(m: torch.Tensor, sv: torch.Tensor | None = None) -> float:
    """Roy & Vetterli's effective rank of a matrix (``exp`` of the entropy of normalized singular values)."""
    sv = singular_values(m) if sv is None else sv
    total = float(sv.sum())
    if total <= 0:
        return 0.0
    p = sv / total
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum()))


def lowrank_errors(m: torch.Tensor, ranks=(8, 16, 32), sv: torch.Tensor | None = None) -> dict[int, float]:
    """Relative Frobenius error of the best rank-r approximation, for each r in ``ranks``."""
    sv = singular_values(m) if sv is None else sv
    sq = sv * sv
    total = float(sq.sum())
    out = {}
    for r in ranks:
        out[int(r)] = math.sqrt(float(sq[r:].sum()) / total) if total > 0 else 0.0
    return out


def growth_exponent(steps, values, min_step: int = 1) -> dict | None:
    """Fit ``values ~ c * steps**alpha`` by least squares in log-log (points with step >= ``min_step`` and
    a positive value). Returns ``{"alpha", "c", "r2", "points"}`` or ``None`` with fewer than 3 points."""
    pts = [(math.log(s), math.log(v)) for s, v in zip(steps, values) if v is not None and v > 0 and s >= min_step]
    if len(pts) < 3:
        return None
    xs, ys = zip(*pts)
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    alpha = sxy / sxx
    c = my - alpha * mx
    ss_res = sum((y - (c + alpha * x)) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return {"alpha": alpha, "c": math.exp(c), "r2": 1 - ss_res / ss_tot if ss_tot > 0 else 1.0, "points": n}


def growth_kind(alpha: float | None) -> str:
    """Words for a growth exponent: ``linear`` (>= 0.8), ``sub-linear`` (0.2..0.8), ``bounded`` (< 0.2)."""
    if alpha is None:
        return "not measured"
    if alpha >= 1.2:
        return "super-linear"
    if alpha >= 0.8:
        return "linear"
    if alpha >= 0.2:
        return "sub-linear"
    return "bounded (no growth)"


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman rank correlation (average ranks for ties); ``None`` for fewer than 3 pairs."""
    pairs = [(a, b) for a, b in zip(x, y) if a is not None and b is not None]
    if len(pairs) < 3:
        return None

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks([p[0] for p in pairs]), ranks([p[1] for p in pairs])
    n = len(pairs)
    mx, my = sum(rx) / n, sum(ry) / n
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return num / den if den > 0 else None
