"""A synthetic experiment on error correction of low-bit EMA states (the characterization study's P5 part).

``synthetic_ema_errors()`` feeds one heavy-tailed gradient sequence to EMA states stored in naive 4-bit and to
the same states with error correction every K steps, and records how far each drifts from the exact fp32 EMA:
whether the error accumulates over steps, and how much correction bounds it. It needs no model and no data.
"""

from __future__ import annotations

import torch

from ..state.corrected import ErrorCorrected
from ..state.quantized import Quantized


def synthetic_ema_errors(steps: int = 2000, numel: int = 8192, seed: int = 0, ks=(10, 100, 1000), record_every: int = 10) -> dict:
    """How the storage error of an EMA state accumulates, with and without error correction every K steps.

    EMA states (m: beta 0.9, v: beta 0.999) stored with the naive 4-bit codecs (linear maps, blocks of 2048,
    nearest rounding), with and without error correction every K steps (8-bit residual), against the exact
    fp32 EMA of the same gradients. Gradients: a fixed per-coordinate mean plus Student-t noise (3 degrees of
    freedom: heavy-tailed), with log-normal per-coordinate scales.

    Args:
        steps: EMA updates (default 2000).
        numel: elements of the state (default 8192).
        seed: seeds the gradients (default 0).
        ks: the correction intervals K compared with no correction (default 10, 100, 1000).
        record_every: record the errors every this many steps (default 10).

    Returns:
        ``{"setting", "steps": [recorded steps], "m": {codec: [relative L2 error]}, "v": {...},
        "m_late_mean", "v_late_mean"}`` (late: the mean over the second half of the recorded steps).
    """
    gen = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(numel, generator=gen))
    mu = 0.3 * torch.randn(numel, generator=gen)
    cases = {"m": (0.9, 1, Quantized(4, 2048, "linear", True, "nearest", "float32")),
             "v": (0.999, 2, Quantized(4, 2048, "linear", False, "nearest", "float32"))}  # fmt: skip
    out = {"setting": {"steps": steps, "numel": numel, "seed": seed, "ks": list(ks), "residual": "8bit",
                       "codecs": "4-bit linear maps, blocks of 2048, nearest rounding (naive)",
                       "gradients": "per-coordinate mean + Student-t(3) noise, log-normal scales"},
           "steps": []}  # fmt: skip
    param = torch.empty(numel)
    runs = {}
    for case, (beta, power, base) in cases.items():
        codecs = {"none": base, **{f"K={k}": ErrorCorrected(base, "8bit", k, beta) for k in ks}}
        states = {}
        for name, c in codecs.items():
            states[name] = {}
            c.init(states[name], "s", param)
        runs[case] = (beta, power, codecs, states, torch.zeros(numel))
        out[case] = {name: [] for name in codecs}
    for t in range(1, steps + 1):
        z = torch.randn(numel, generator=gen)
        chi2 = sum(torch.randn(numel, generator=gen) ** 2 for _ in range(3)) / 3
        g = scale * (mu + z / chi2.sqrt())
        rec = t % record_every == 0
        if rec:
            out["steps"].append(t)
        for case, (beta, power, codecs, states, exact) in runs.items():
            gp = g if power == 1 else g * g
            exact.mul_(beta).add_(gp, alpha=1 - beta)
            for name, c in codecs.items():
                x = c.decode(states[name], "s", param) * beta + (1 - beta) * gp
                c.encode(states[name], "s", x, salt=t)
                if rec:
                    q = c.decode(states[name], "s", param)
                    out[case][name].append(float((q - exact).norm() / exact.norm()))
    for case in cases:
        half = len(out["steps"]) // 2
        out[case + "_late_mean"] = {n: sum(v[half:]) / max(1, len(v) - half) for n, v in out[case].items()}
    return out
