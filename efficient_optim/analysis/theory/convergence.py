"""Rate and error floor of an optimizer on a problem with a known optimum, and what its update error predicts.

``track(problem, make_opt, make_ref, steps)`` runs an optimizer from the problem's start at a constant
learning rate and records every step: the relative distance ``D_t = ||x_t - x*|| / ||x_0 - x*||``, the
relative suboptimality ``(f(x_t) - f*) / (f(x_0) - f*)``, and, when a *reference* optimizer is given (the
same update rule with exact fp32 states, e.g. AdamW for QAdamW 4-bit), the update error ``e_t = U_t - U_ref,t``:
``U_t`` is the step the optimizer took and ``U_ref,t`` the step the reference takes from the same point with
the same gradient, its own states having seen the same gradients from the start (a shadow copy, stepped
beside the optimizer, never fed back). ``rho_t = ||e_t|| / ||U_ref,t||`` is the *relative update error*.

``summarize`` measures the rate (steps per decade of ``D``, from a least-squares fit of ``log10 D_t`` over the
linear phase: from the first step below 10 % of ``D_0`` (or, in a run that never gets there, the middle step)
to the first step within 3x of the floor) and the
floor (median ``D`` over the last 10 % of steps; ``floor_reached`` is False while ``D`` still falls across that
window, from the median of its first quarter to that of its last, by more than a quarter of the decades the run
fell per window-length on average: then the run is still converging and the floor is only an upper bound).

The model the predictions come from (``predict``). Write the run as the reference's iteration plus an error,
``x_{t+1} - x* = T(x_t) - x* + e_t``, and let the reference contract the distance by ``q`` per step (its
measured rate) down to its own floor ``F_ref``. Then:

- rate: ``D_{t+1} <= (q + rho r) D_t`` when errors point the worst way (*aligned*), ``>= (q - rho r) D_t`` when
  they point the best way, and ``D_{t+1}^2 = (q^2 + rho^2 r^2) D_t^2`` when they are independent of the
  direction to the optimum and zero-mean (*independent*), where ``r = ||U_ref|| / D`` (both measured in the
  linear phase, medians). The measured rate should lie in the aligned band; near the independent value if
  the errors are random.
- floor: with ``E`` the rms update error over the last 10 % of steps (relative to ``D_0``), the stationary
  distance is at most ``F_ref + E / (1 - q)`` (aligned) and about ``sqrt(F_ref^2 + E^2 / (1 - q^2))``
  (independent).

It is a model of an error added to a contraction; it holds for rules whose step is a contraction near the
optimum (gradient descent with momentum at a stable learning rate) and can break where the error changes
the rule itself (a second moment stored larger or smaller changes every later step size: Adam, whose own
constant-lr behaviour near the optimum is not a contraction either). The report says which.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .problems import Problem

DIVERGED = 1e3  # a run stops as diverged when D_t exceeds this (or is not finite)
FLOOR_WINDOW = 0.1  # the last 10 % of steps
LINEAR_START = 0.1  # the linear phase starts at the first D_t below this
NEAR_FLOOR = 3.0  # ... and ends at the first D_t within this factor of the floor
STILL_FALLING = 0.25  # D still falls across the floor window by more than this fraction of its average: no floor yet
MIN_DROP = 0.005  # ... or, for a run that hardly moved at all, by more than this many decades


def track(problem: Problem, make_opt: Callable, make_ref: Callable | None, steps: int) -> dict:
    """Run one optimizer on ``problem`` for ``steps`` steps and record every step.

    Args:
        problem: the problem (its ``x0`` is copied; the problem is not changed).
        make_opt: ``make_opt([param])`` -> the optimizer under test (constant learning rate).
        make_ref: ``make_ref([param])`` -> the reference optimizer stepped on a shadow copy, or ``None`` to
            skip the update error (e.g. when the optimizer is its own reference).
        steps: optimizer steps (>= 1).

    Returns:
        ``{"dist", "subopt", "err", "ref_update", "update", "diverged_at"}``: lists with one entry per step
        (``dist[0]``/``subopt[0]`` are the start, ``dist[t]`` after ``t`` steps; ``err``/``ref_update`` are
        absolute norms divided by ``||x_0 - x*||``, empty without a reference).
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    x = problem.x0.clone().requires_grad_(True)
    opt = make_opt([x])
    shadow = problem.x0.clone().requires_grad_(True) if make_ref is not None else None
    ref = make_ref([shadow]) if shadow is not None else None
    d0 = float((problem.x0.double() - problem.x_star).norm())
    f0 = problem.loss(problem.x0) - problem.f_star
    out = {"dist": [1.0], "subopt": [1.0], "err": [], "ref_update": [], "update": [], "diverged_at": None}
    for t in range(steps):
        before = x.detach().clone()
        g = problem.grad(before)
        x.grad = g.clone()
        opt.step()
        u = x.detach() - before
        out["update"].append(float(u.norm()) / d0)
        if ref is not None:
            with torch.no_grad():
                shadow.copy_(before)
            shadow.grad = g.clone()
            ref.step()
            u_ref = shadow.detach() - before
            out["err"].append(float((u - u_ref).norm()) / d0)
            out["ref_update"].append(float(u_ref.norm()) / d0)
        dist = float((x.detach().double() - problem.x_star).norm()) / d0
        if not math.isfinite(dist) or dist > DIVERGED:
            out["diverged_at"] = t + 1
            break
        out["dist"].append(dist)
        out["subopt"].append((problem.loss(x.detach()) - problem.f_star) / f0)
    return out


def _median(values: list[float]) -> float | None:
    vals = sorted(v for v in values if math.isfinite(v))
    if not vals:
        return None
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else 0.5 * (vals[mid - 1] + vals[mid])


def _slope(ts: list[int], ys: list[float]) -> float:
    n = len(ts)
    mt, my = sum(ts) / n, sum(ys) / n
    var = sum((t - mt) ** 2 for t in ts)
    return sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / var


def summarize(trace: dict) -> dict:
    """Rate, floor and update-error summaries of one ``track`` result (definitions in the module docstring).

    Returns ``{"diverged_at", "final_dist", "floor", "floor_reached", "subopt_floor", "rate_window",
    "steps_per_decade", "q", "rho_linear", "update_ratio_linear", "rho_floor", "err_floor_rms"}``; a value
    that cannot be measured is ``None`` (too few steps in the linear phase, no reference, a divergence).
    """
    dist = trace["dist"]
    n = len(dist) - 1
    out = {"diverged_at": trace["diverged_at"], "final_dist": dist[-1]}
    if trace["diverged_at"] is not None or n < 10:
        return out | {"floor": None, "floor_reached": False, "subopt_floor": None, "rate_window": None,
                      "steps_per_decade": None, "q": None, "rho_linear": None, "update_ratio_linear": None,
                      "rho_floor": None, "err_floor_rms": None}  # fmt: skip
    w0 = n - max(2, int(FLOOR_WINDOW * n))
    window = dist[w0 + 1 :]
    floor = _median(window)
    quarter = max(1, len(window) // 4)
    first, last = _median(window[:quarter]), _median(window[-quarter:])
    drop = math.log10(max(first, 1e-300) / max(last, 1e-300))  # decades fallen across the window
    average = math.log10(max(dist[0], 1e-300) / max(last, 1e-300)) * len(window) / n  # the run's average per window
    reached = drop <= max(STILL_FALLING * average, MIN_DROP)
    start = next((t for t, d in enumerate(dist) if d <= LINEAR_START), None)
    if start is None and dist[-1] < dist[n // 2]:  # a slow run: its second half, while it still falls
        start = n // 2
    end = next((t for t, d in enumerate(dist) if d <= NEAR_FLOOR * floor), n) if reached else n
    rate = q = None
    if start is not None and end - start >= 5:
        ts = list(range(start, end + 1))
        slope = _slope(ts, [math.log10(max(dist[t], 1e-300)) for t in ts])
        if slope < 0:
            rate, q = -1.0 / slope, 10.0**slope
    out |= {"floor": floor, "floor_reached": reached, "subopt_floor": _median(trace["subopt"][w0 + 1 :]),
            "rate_window": None if rate is None else [start, end], "steps_per_decade": rate, "q": q}  # fmt: skip
    err, ref_u = trace["err"], trace["ref_update"]
    if not err:
        return out | {"rho_linear": None, "update_ratio_linear": None, "rho_floor": None, "err_floor_rms": None}
    lin = range(start, end) if rate is not None else range(0, 0)
    rho = [err[t] / ref_u[t] for t in lin if ref_u[t] > 0]
    ratio = [ref_u[t] / dist[t] for t in lin if dist[t] > 0]
    tail = err[w0:]
    tail_rho = [e / u for e, u in zip(tail, ref_u[w0:]) if u > 0]
    out |= {"rho_linear": _median(rho), "update_ratio_linear": _median(ratio), "rho_floor": _median(tail_rho),
            "err_floor_rms": math.sqrt(sum(e * e for e in tail) / len(tail))}  # fmt: skip
    return out


def per_step(steps_per_decade: float | None) -> float | None:
    """Per-step contraction ``q = 10 ** (-1 / steps_per_decade)``."""
    return None if steps_per_decade is None else 10.0 ** (-1.0 / steps_per_decade)


def steps_per_decade(q: float | None) -> float | None:
    """Steps per decade of a per-step contraction ``q`` (``None`` when ``q >= 1``: no convergence)."""
    if q is None or q >= 1 or q <= 0:
        return None if q is None or q >= 1 else 0.0
    return -1.0 / math.log10(q)


def predict(run: dict, reference: dict) -> dict:
    """The model's predictions for one run from its reference's rate and floor and its own update error.

    Args:
        run: ``summarize`` of the optimizer under test (with a reference, so ``rho_*`` are set).
        reference: ``summarize`` of the reference optimizer's own run on the same problem.

    Returns:
        ``{"rate_aligned_slow", "rate_aligned_fast", "rate_independent"}`` in steps per decade (``None`` for
        no convergence), ``{"floor_aligned", "floor_independent"}`` (relative distances), and the verdicts
        ``rate_in_band``, ``rate_near_independent`` (within 25 %), ``floor_below_aligned``,
        ``floor_near_independent`` (within a factor 2); each ``None`` when a quantity is missing.
    """
    q = reference.get("q")
    out = dict.fromkeys(("rate_aligned_slow", "rate_aligned_fast", "rate_independent", "floor_aligned",
                         "floor_independent", "rate_in_band", "rate_near_independent", "floor_below_aligned",
                         "floor_near_independent"))  # fmt: skip
    if q is None or run.get("rho_linear") is None and run.get("err_floor_rms") is None:
        return out
    if run.get("rho_linear") is not None and run.get("update_ratio_linear") is not None:
        a = run["rho_linear"] * run["update_ratio_linear"]
        slow, fast, ind = steps_per_decade(q + a), steps_per_decade(max(q - a, 1e-300)), steps_per_decade(math.hypot(q, a))
        out |= {"rate_aligned_slow": slow, "rate_aligned_fast": fast, "rate_independent": ind}
        measured = run.get("steps_per_decade")
        if measured is not None:
            out["rate_in_band"] = fast <= measured and (slow is None or measured <= slow)
            out["rate_near_independent"] = ind is not None and abs(measured / ind - 1) <= 0.25
    if run.get("err_floor_rms") is not None and run.get("floor_reached") and reference.get("floor_reached"):
        e, f_ref = run["err_floor_rms"], reference["floor"]
        out["floor_aligned"] = f_ref + e / (1 - q)
        out["floor_independent"] = math.sqrt(f_ref**2 + e**2 / (1 - q * q))
        if run.get("floor") is not None:
            out["floor_below_aligned"] = run["floor"] <= out["floor_aligned"]
            ratio = run["floor"] / out["floor_independent"] if out["floor_independent"] > 0 else math.inf
            out["floor_near_independent"] = 0.5 <= ratio <= 2.0
    return out


def downsample(values: list[float], points: int = 200) -> tuple[list[int], list[float]]:
    """``(steps, values)`` at about ``points`` log-and-linearly spread steps (the first and last kept), for JSON."""
    n = len(values)
    if n <= points:
        return list(range(n)), list(values)
    half = points // 2
    lin = {round(i * (n - 1) / (half - 1)) for i in range(half)}
    log = {min(n - 1, round(10 ** (i * math.log10(n) / (half - 1))) - 1) for i in range(half)}
    idx = sorted(lin | log)
    return idx, [values[i] for i in idx]
