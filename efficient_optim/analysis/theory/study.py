"""The three studies of ``effopt theory`` as plain functions returning JSON-ready data.

- ``convergence_study``: optimizers x problems with known optima: rate, floor, update error and the model's
  predictions (``convergence``).
- ``ema_study``: moment EMAs stored by different codecs: accumulated error against the geometric sums (``ema``).
- ``bits_study``: bits vs reachable epsilon for weights and momentum stored at 2-8 bits (``bits``).

Optimizers come in as factories (``make([param]) -> torch.optim.Optimizer``), so this module needs no
registry or harness; ``bench.theory_cmd`` builds them from registry specs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...state.dense import Dense
from ...state.error_feedback import ErrorFeedback
from ...state.quantized import Quantized
from . import bits as bitlib
from .convergence import downsample, predict, summarize, track
from .ema import closer_to, ema_error
from .problems import Problem


@dataclass
class OptimizerCase:
    """One optimizer of the convergence study.

    Args:
        label: its name in reports (a registry spec).
        make: ``make([param])`` -> the optimizer.
        reference: the label of its reference (exact-state) optimizer, or ``None`` when it is its own.
        lr: the learning rate it runs at (for the report).
    """

    label: str
    make: Callable
    reference: str | None
    lr: float


def convergence_study(problems: list[Problem], cases: list[OptimizerCase], steps: int, progress=None) -> dict:
    """Every case on every problem; references first (their rate and floor feed the predictions).

    Args:
        problems: problems with known optima.
        cases: the optimizers; every ``reference`` must be the label of a case in the list.
        steps: steps per run (constant learning rate).
        progress: ``progress(text)`` called after each run, or ``None``.
    """
    labels = {c.label: c for c in cases}
    missing = sorted({c.reference for c in cases if c.reference is not None and c.reference not in labels})
    if missing:
        raise ValueError(f"reference optimizers missing from the cases: {', '.join(missing)}")
    order = [c for c in cases if c.reference is None] + [c for c in cases if c.reference is not None]
    out = {"steps": steps, "problems": [], "runs": []}
    for p in problems:
        out["problems"].append({"name": p.name, "description": p.description, "mu": p.mu, "L": p.L, "kappa": p.kappa})
        done: dict[str, dict] = {}
        for c in order:
            t0 = time.perf_counter()
            ref = labels[c.reference] if c.reference is not None else None
            trace = track(p, c.make, ref.make if ref is not None else None, steps)
            summary = summarize(trace)
            done[c.label] = summary
            pred = predict(summary, done[c.reference]) if ref is not None else None
            idx, dist = downsample(trace["dist"])
            out["runs"].append({"problem": p.name, "optimizer": c.label, "reference": c.reference, "lr": c.lr,
                                "summary": summary, "prediction": pred, "seconds": time.perf_counter() - t0,
                                "curve": {"steps": idx, "dist": dist}})  # fmt: skip
            if progress is not None:
                progress(f"{p.name} {c.label}")
    return out


def ema_codecs(beta: float, square: bool) -> dict:
    """The codecs compared for one moment: bf16 (nearest and stochastic), 8-bit and 4-bit (nearest), 4-bit stochastic, 4-bit with
    error feedback (fp32 residual, decay = beta); the library's default maps for m (``dynamic``) or v
    (``dynamic_nozero`` at 8 bits, ``sqrt_nozero`` at 4)."""
    signed = not square
    m8, m4 = ("dynamic_nozero", "sqrt_nozero") if square else ("dynamic", "dynamic")
    return {"bf16": Dense(torch.bfloat16), "bf16 stochastic": Dense(torch.bfloat16, rounding="stochastic"),
            "8-bit": Quantized(8, map=m8, signed=signed),
            "4-bit": Quantized(4, map=m4, signed=signed),
            "4-bit stochastic": Quantized(4, map=m4, signed=signed, rounding="stochastic"),
            "4-bit + error feedback": ErrorFeedback(Quantized(4, map=m4, signed=signed), residual=torch.float32, decay=beta)}  # fmt: skip


EMA_REGIMES = {"noise": (0.0, 1.0), "signal": (1.0, 0.1)}  # (signal, noise) of the gradient stream


def ema_study(steps_m: int, steps_v: int, regimes=("noise", "signal"), seed: int = 0, progress=None) -> dict:
    """m (beta 0.9, EMA of g) and v (beta 0.999, EMA of g^2) under every codec of ``ema_codecs`` and regime.

    Args:
        steps_m, steps_v: EMA updates for m and v (v needs several ``1/(1-beta) = 1000`` steps to settle).
        regimes: gradient streams from ``EMA_REGIMES``: ``noise`` (zero-mean) and ``signal`` (a fixed mean 10x
            the noise, like a gradient with a consistent direction).
        seed: seed of the streams.
        progress: ``progress(text)`` after each case, or ``None``.
    """
    out = {"regimes": {r: {"signal": EMA_REGIMES[r][0], "noise": EMA_REGIMES[r][1]} for r in regimes}, "runs": []}
    for moment, beta, square, steps in (("m", 0.9, False, steps_m), ("v", 0.999, True, steps_v)):
        for regime in regimes:
            signal, noise = EMA_REGIMES[regime]
            for name, codec in ema_codecs(beta, square).items():
                res = ema_error(codec, beta, steps, square=square, signal=signal, noise=noise, seed=seed,
                                every=max(1, steps // 200))  # fmt: skip
                out["runs"].append({"moment": moment, "beta": beta, "regime": regime, "codec": name, "steps": steps,
                                    "steady": res["steady"], "closer_to": closer_to(res["steady"]),
                                    "final_relative_error": res["err"][-1] / res["state_norm"][-1],
                                    "curve": {k: res[k] for k in ("steps", "err", "independent", "aligned")}})  # fmt: skip
                if progress is not None:
                    progress(f"ema {moment} {regime} {name}")
    return out


def bound_formula(problem: Problem, bits: int, block_size: int = 64) -> float:
    """Uniform-rounding estimate of the representability bound: per block, rounding to a grid of step
    ``s / (2**(b-1) - 1)`` (``s`` the block's absmax) leaves an rms error of step / sqrt(12), so
    ``eps ~ rms_blocks(s) / (sqrt(12) (2**(b-1) - 1) rms(x*))``: one more bit halves it (bits = log2(1/eps) + c)."""
    x = problem.x_star.reshape(-1)
    blocks = x[: x.numel() // block_size * block_size].reshape(-1, block_size)
    s_rms = float(blocks.abs().amax(dim=1).pow(2).mean().sqrt())
    x_rms = float(x.pow(2).mean().sqrt())
    return s_rms / (math.sqrt(12) * (2 ** (bits - 1) - 1) * x_rms)


def bits_study(problem: Problem, steps: int, bits=bitlib.BITS, targets=bitlib.TARGETS, progress=None) -> dict:
    """Reachable epsilon for each target x rounding x error feedback x bits on ``problem``.

    Args:
        problem: a problem with a known optimum (the rotated quadratic in ``effopt theory``).
        steps: iterations per run.
        bits: widths to try (default 2..8).
        targets: ``weights`` and/or ``momentum`` (``theory.bits``).
        progress: ``progress(text)`` after each curve, or ``None``.
    """
    out = {"problem": problem.name, "steps": steps,
           "lower_bound": {str(b): bitlib.best_representable(problem, b) for b in bits},
           "bound_formula": {str(b): bound_formula(problem, b) for b in bits}, "runs": []}  # fmt: skip
    for target in targets:
        fp32 = bitlib.reachable_eps(problem, target, 32, steps=steps)["eps"]
        out["runs"].append({"target": target, "rounding": "nearest", "feedback": False, "label": "fp32 (unquantized)",
                            "eps": {str(b): fp32 for b in bits}})  # fmt: skip
        for rounding in ("nearest", "stochastic"):
            for feedback in (False, True):
                eps = {}
                for b in bits:
                    e = bitlib.reachable_eps(problem, target, b, rounding, feedback, steps)["eps"]
                    eps[str(b)] = e if math.isfinite(e) else None
                label = rounding + (" + error feedback" if feedback else "")
                out["runs"].append({"target": target, "rounding": rounding, "feedback": feedback, "label": label,
                                    "eps": eps})  # fmt: skip
                if progress is not None:
                    progress(f"bits {target} {label}")
    return out
