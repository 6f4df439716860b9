"""The measures of the error decomposition (``analysis.decomposition``): per layer and step the relative error
and cosine of each shadow's update direction against the dense one, the three models of how the two
sources combine (linear, independent, multiplicative), the fit that picks one, the verdict and its sentence,
and the per-layer and summary aggregates."""

from __future__ import annotations

import math
import statistics

import torch

from .decomposition_variants import VARIANTS

SOURCES = ("quant", "factor", "both")
MODELS = ("linear", "independent", "multiplicative")
VERDICTS = (
    "none",
    "single_source",
    "subadditive",
    "independent",
    "additive",
    "multiplicative",
    "supermultiplicative",
)
ACTIVE_TOL = 1e-6  # a source's error below this on a layer: the source is not active there
_MODEL_VERDICT = {"linear": "additive", "independent": "independent", "multiplicative": "multiplicative"}


def _layer_record(d: dict[str, torch.Tensor]) -> dict:
    ref = d["dense"].double()
    nref = float(ref.norm())
    if nref == 0.0 or not math.isfinite(nref):
        empty = [f"{k}_{x}" for x in SOURCES for k in ("err", "cos")] + ["coupling", "err_cos"]
        return dict.fromkeys(empty)
    rec: dict = {}
    deltas = {}
    for x in SOURCES:
        dx = d[x].double()
        deltas[x] = dx - ref
        rec[f"err_{x}"] = float(deltas[x].norm()) / nref
        ndx = float(dx.norm())
        rec[f"cos_{x}"] = float(torch.dot(dx.flatten(), ref.flatten())) / (ndx * nref) if ndx > 0 else 0.0
    rec["coupling"] = float((deltas["both"] - deltas["quant"] - deltas["factor"]).norm()) / nref
    nq, nf = float(deltas["quant"].norm()), float(deltas["factor"].norm())
    rec["err_cos"] = (
        float(torch.dot(deltas["quant"].flatten(), deltas["factor"].flatten())) / (nq * nf)
        if nq > 0 and nf > 0
        else None
    )
    rec["_sq"] = {x: float(deltas[x].norm()) ** 2 for x in SOURCES} | {"ref": nref**2}
    return rec


def predictions(e_q: float, e_f: float) -> dict[str, float]:
    """The combined error each model predicts from the two errors alone."""
    return {
        "linear": e_q + e_f,
        "independent": math.hypot(e_q, e_f),
        "multiplicative": (1 + e_q) * (1 + e_f) - 1,
    }


def _weighted(pairs: list[tuple[float, float]]) -> float | None:
    pairs = [(v, w) for v, w in pairs if v is not None and math.isfinite(v)]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total > 0 else None


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def classify(points: list[tuple[float, float, float]]) -> dict:
    """Which model fits ``(e_q, e_f, e_both)`` points best, and the verdict (one of ``VERDICTS``).

    Only points where both sources are active (``e_q``, ``e_f`` > ``ACTIVE_TOL``) are fitted. Returns
    ``fit`` (per model: ``mean_abs_log_ratio`` and ``median_ratio`` = median of measured / predicted),
    ``best_model``, ``verdict``, ``points`` (how many were fitted) and ``distinguishable`` (whether the
    linear and multiplicative predictions differ by more than 5 % on the median point).
    """
    pts = [
        (q, f, b)
        for q, f, b in points
        if q > ACTIVE_TOL and f > ACTIVE_TOL and b is not None and math.isfinite(b)
    ]
    if not pts:
        any_error = any(
            (q or 0) > ACTIVE_TOL or (f or 0) > ACTIVE_TOL or (b or 0) > ACTIVE_TOL for q, f, b in points
        )
        return {"fit": {}, "best_model": None, "verdict": "single_source" if any_error else "none", "points": 0,
                "distinguishable": None}  # fmt: skip
    fit = {}
    for model in MODELS:
        ratios = [max(b, 1e-30) / predictions(q, f)[model] for q, f, b in pts]
        fit[model] = {"mean_abs_log_ratio": sum(abs(math.log(r)) for r in ratios) / len(ratios),
                      "median_ratio": statistics.median(ratios)}  # fmt: skip
    best = min(MODELS, key=lambda m: fit[m]["mean_abs_log_ratio"])
    if fit["independent"]["median_ratio"] < 0.9:
        verdict = "subadditive"
    elif fit["multiplicative"]["median_ratio"] > 1.1:
        verdict = "supermultiplicative"
    else:
        verdict = _MODEL_VERDICT[best]
    gaps = [predictions(q, f)["multiplicative"] / predictions(q, f)["linear"] - 1 for q, f, _ in pts]
    return {"fit": fit, "best_model": best, "verdict": verdict, "points": len(pts),
            "distinguishable": statistics.median(gaps) > 0.05}  # fmt: skip


def verdict_text(summary: dict) -> str:
    """The verdict as a plain sentence with the numbers behind it."""
    v = summary["verdict"]
    if v == "none":
        return "No error: every compressed variant gives the dense AdamW direction (this configuration stores both moments exactly)."
    e = {x: summary.get(f"mean_err_{x}") or 0.0 for x in SOURCES}
    if v == "single_source":
        src = "quantization" if e["quant"] >= e["factor"] else "factoring/low rank"
        return (f"Only one source of error is active ({src}): mean relative error {e['both']:.4f}; no layer has both "
                "a quantized and a factored/low-rank moment, so there is nothing to decompose.")  # fmt: skip
    fit = summary["fit"]
    words = {
        "independent": "The errors add in quadrature, as independent errors do: err_both ~ sqrt(e_q^2 + e_f^2).",
        "additive": "The errors add linearly: err_both ~ e_q + e_f.",
        "multiplicative": "The errors multiply: err_both ~ (1 + e_q)(1 + e_f) - 1.",
        "subadditive": "The errors partly cancel: err_both is below even the independent (quadrature) sum.",
        "supermultiplicative": "The errors couple strongly: err_both exceeds even the multiplicative prediction.",
    }
    parts = [words[v],
             f"Mean relative error of the update direction: quantization alone {e['quant']:.4f}, factoring alone "
             f"{e['factor']:.4f}, both {e['both']:.4f}.",
             "Measured / predicted (median over steps and layers): " + ", ".join(
                 f"{m} {fit[m]['median_ratio']:.3f} (misfit {fit[m]['mean_abs_log_ratio']:.3f})" for m in MODELS) + ".",
             f"Interaction err_both - (e_q + e_f) = {summary['mean_interaction']:+.4f}; coupling vector "
             f"{summary['mean_coupling']:.4f}; cos(delta_q, delta_f) = {format_number(summary['mean_err_cos'])}."]  # fmt: skip
    if summary.get("distinguishable") is False:
        parts.append("At these error sizes the linear and multiplicative predictions differ by under 5 %, so those "
                     "two models are hard to tell apart; the independent-vs-additive distinction is the robust one.")  # fmt: skip
    return " ".join(parts)


def format_number(x, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def measure_step(step: int, loss: float, d: dict, layers: list[dict], records: list[dict]) -> dict:
    rows = []
    sq = {x: 0.0 for x in SOURCES} | {"ref": 0.0}
    for i, layer in enumerate(layers):
        rec = _layer_record({v: d[v][i] for v in VARIANTS})
        parts = rec.pop("_sq", None)
        if rec["err_both"] is not None:
            preds = predictions(rec["err_quant"], rec["err_factor"])
            rec.update({f"pred_{m}": preds[m] for m in MODELS})
            rec["interaction"] = rec["err_both"] - preds["linear"]
        else:
            rec.update({f"pred_{m}": None for m in MODELS} | {"interaction": None})
        records.append({"step": step, "layer": layer["name"], **rec})
        if layer["aggregated"]:
            rows.append((rec, layer["numel"]))
            if parts:
                for k in sq:
                    sq[k] += parts[k]
    row: dict = {"step": step, "loss": loss}
    keys = [f"{k}_{x}" for k in ("err", "cos") for x in SOURCES] + [f"pred_{m}" for m in MODELS]
    for key in [*keys, "coupling", "interaction"]:
        row[key] = _weighted([(r[key], w) for r, w in rows])
    for x in SOURCES:
        row[f"global_err_{x}"] = math.sqrt(sq[x] / sq["ref"]) if sq["ref"] > 0 else None
    return row


def per_layer_means(layers: list[dict], records: list[dict]) -> dict:
    out = {}
    for layer in layers:
        mine = [r for r in records if r["layer"] == layer["name"]]
        entry = {"numel": layer["numel"], "compressed": layer["compressed"], "aggregated": layer["aggregated"],
                 "m": layer["codecs"]["both"]["m"], "v": layer["codecs"]["both"]["v"]}  # fmt: skip
        for key in (
            [f"err_{x}" for x in SOURCES] + [f"cos_{x}" for x in SOURCES] + ["coupling", "interaction"]
        ):
            entry[f"mean_{key}"] = _mean(r[key] for r in mine)
        out[layer["name"]] = entry
    return out


def summarize(step_rows: list[dict], records: list[dict], layers: list[dict]) -> dict:
    aggregated = {layer["name"] for layer in layers if layer["aggregated"]}
    s: dict = {"measured_steps": len(step_rows), "layers": len(layers),
               "compressed_layers": sum(layer["compressed"] for layer in layers),
               "compressed_numel": sum(layer["numel"] for layer in layers if layer["compressed"]),
               "aggregated_over": "compressed layers" if any(layer["compressed"] for layer in layers) else "all layers"}  # fmt: skip
    keys = (
        [f"err_{x}" for x in SOURCES] + [f"cos_{x}" for x in SOURCES] + [f"global_err_{x}" for x in SOURCES]
    )
    for key in [*keys, *(f"pred_{m}" for m in MODELS), "coupling", "interaction"]:
        s[f"mean_{key}"] = _mean(r.get(key) for r in step_rows)
        s[f"last_{key}"] = step_rows[-1].get(key) if step_rows else None
    mine = [r for r in records if r["layer"] in aggregated]
    s["mean_err_cos"] = _mean(r["err_cos"] for r in mine)
    points = [(r["err_quant"], r["err_factor"], r["err_both"]) for r in mine if r["err_both"] is not None]
    s.update(classify(points))
    return s
