"""How quantization error accumulates in a moment EMA, against the geometric-sum predictions.

An optimizer keeps ``m_t = beta m_{t-1} + (1 - beta) s_t`` (``s = g`` for the first moment, ``g^2`` for the
second) but stores it through a codec: the rule computes ``value_t = beta q_{t-1} + (1 - beta) s_t`` from the
stored ``q_{t-1}`` and stores ``q_t = codec(value_t)``. With ``eps_t = value_t - q_t`` (what this step's
encode lost) the stored state's error ``d_t = m_t - q_t`` obeys exactly ``d_t = beta d_{t-1} + eps_t``, so

- *independent* errors (zero-mean, uncorrelated across steps) give ``||d_t||^2 = sum_k beta^(2k) ||eps_{t-k}||^2``,
  at most ``1 / (1 - beta^2)`` times the one-step error variance (5.3x at beta 0.9, 500x at 0.999);
- *aligned* errors (the same sign at every step) give ``||d_t|| = sum_k beta^k ||eps_{t-k}||``, up to
  ``1 / (1 - beta)`` times the one-step error (10x at 0.9, 1000x at 0.999).

``ema_error(...)`` streams synthetic gradients through any ``StateCodec`` (``state.Quantized``,
``state.Dense``, ``state.error_feedback.ErrorFeedback``, ...) and records ``||d_t||``, ``||eps_t||`` and both
predictions computed from the measured ``||eps_t||`` (so the predictions use no assumed error size).
Nearest rounding of a slowly changing state is the aligned case: once ``(1 - beta) |s - q|`` is below half a
quantization step the stored value stops moving (the EMA *stagnates*); stochastic rounding is unbiased and
close to independent; error feedback stores ``value + beta e`` (decay = beta) so that ``d_t`` is one
quantization error, not a sum.
"""

from __future__ import annotations

import math

import torch

from ...state.codec import StateCodec


def gradient_stream(shape: tuple[int, ...], steps: int, signal: float, noise: float, seed: int = 0):
    """Yield ``steps`` gradients ``mean + noise * N(0, 1)`` with a fixed per-element ``mean = signal * N(0, 1)``.

    Args:
        shape: gradient shape.
        steps: how many.
        signal: std of the persistent per-element mean (0: pure noise).
        noise: std of the fresh noise of each step.
        seed: seed of the mean and the noise.
    """
    gen = torch.Generator().manual_seed(seed)
    mean = signal * torch.randn(shape, generator=gen)
    for _ in range(steps):
        yield mean + noise * torch.randn(shape, generator=gen)


def ema_error(codec: StateCodec, beta: float, steps: int, *, square: bool = False, signal: float = 1.0,
              noise: float = 1.0, shape: tuple[int, int] = (64, 64), seed: int = 0, every: int = 1) -> dict:  # fmt: skip
    """Stream gradients through an EMA stored by ``codec`` and measure its accumulated error.

    Args:
        codec: how the state is stored (e.g. ``Quantized(4, rounding="stochastic")``).
        beta: the EMA's decay (0 < beta < 1).
        steps: EMA updates.
        square: EMA of ``g^2`` (a second moment; use an unsigned codec) instead of ``g``. Default False.
        signal, noise: the gradient stream (``gradient_stream``). Defaults 1.0 and 1.0.
        shape: the state's shape (default 64 x 64: 4096 elements).
        seed: seed of the stream (default 0); stochastic rounding draws from the step number.
        every: keep one record every this many steps (default 1).

    Returns:
        ``{"steps", "err", "fresh", "independent", "aligned", "state_norm"}``: lists (one entry per kept step)
        of ``||d_t||``, ``||eps_t||``, the two predictions, and ``||m_t||``; plus ``"steady"``: the medians
        over the last quarter of ``||d_t|| / rms||eps||``, of the independent and aligned predictions over the
        same ``rms||eps||``, and the fraction of elements whose stored value did not change in the last step
        (``frozen_frac``).
    """
    if not 0 < beta < 1:
        raise ValueError(f"beta must be in (0, 1), got {beta!r}")
    if not isinstance(steps, int) or steps < 4:
        raise ValueError(f"steps must be an integer >= 4, got {steps!r}")
    param = torch.zeros(shape)
    state: dict = {}
    codec.init(state, "m", param)
    exact = torch.zeros(shape, dtype=torch.float64)
    ind2 = aligned = 0.0
    out = {"steps": [], "err": [], "fresh": [], "independent": [], "aligned": [], "state_norm": []}
    ratios, ind_r, al_r, fresh_sq = [], [], [], []
    frozen = 0.0
    for t, g in enumerate(gradient_stream(shape, steps, signal, noise, seed)):
        s = g * g if square else g
        prev = codec.decode(state, "m", param).clone()
        value = beta * prev + (1 - beta) * s
        codec.encode(state, "m", value, salt=t + 1)
        stored = codec.decode(state, "m", param)
        exact = beta * exact + (1 - beta) * s.double()
        fresh = float((value - stored).norm())
        err = float((exact - stored.double()).norm())
        ind2 = beta * beta * ind2 + fresh * fresh
        aligned = beta * aligned + fresh
        fresh_sq.append(fresh * fresh)
        if t >= 3 * steps // 4:
            window = fresh_sq[-max(1, int(round(1 / (1 - beta)))) :]
            rms = math.sqrt(sum(window) / len(window))
            if rms > 0:
                ratios.append(err / rms)
                ind_r.append(math.sqrt(ind2) / rms)
                al_r.append(aligned / rms)
        if t == steps - 1:
            frozen = float((stored == prev).float().mean())
        if t % every == 0 or t == steps - 1:
            out["steps"].append(t + 1)
            out["err"].append(err)
            out["fresh"].append(fresh)
            out["independent"].append(math.sqrt(ind2))
            out["aligned"].append(aligned)
            out["state_norm"].append(float(exact.norm()))
    out["steady"] = {"ratio": _median(ratios), "independent": _median(ind_r), "aligned": _median(al_r),
                     "frozen_frac": frozen, "ideal_independent": 1 / math.sqrt(1 - beta * beta),
                     "ideal_aligned": 1 / (1 - beta)}  # fmt: skip
    return out


def closer_to(steady: dict) -> str | None:
    """``"independent"`` or ``"aligned"``: which prediction the measured steady ratio is closer to (in log
    distance); ``"below independent"`` when it is below both (the errors cancel); ``None`` without data."""
    r, ind, al = steady.get("ratio"), steady.get("independent"), steady.get("aligned")
    if r is None or ind is None or al is None or r <= 0:
        return None
    if r < ind / 1.5:
        return "below independent"
    return "independent" if abs(math.log(r / ind)) <= abs(math.log(al / r)) else "aligned"


def _median(values: list[float]) -> float | None:
    vals = sorted(values)
    if not vals:
        return None
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else 0.5 * (vals[mid - 1] + vals[mid])
