"""The analyses of a characterization study (``effopt characterize``): every number its report states.

They take a ``StudyData`` (the study's configurations, the finished runs' summary rows, the probe records of
each configuration's first seed) and return plain dicts; they read no file and know nothing of the harness
that produced the data (``bench.characterize_report`` loads a study folder into a ``StudyData`` and renders
the result). ``analyze(study)`` is ``characterization.json`` without its rendered parts.

Errors are relative L2 errors of a stored state against the probe's exact fp32 shadow, over the matrices of
at least ``QUANT_MIN_NUMEL`` elements (smaller ones keep fp32 states in every configuration), at steps from
``ERR_MIN_STEP`` (the first steps are transients).
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, field

from .probe import error_series
from .stats import growth_exponent, growth_kind, spearman

FORMAT = "efficient_optim.characterization/1"
QUANT_MIN_NUMEL = 4096  # parameters below this keep fp32 states in every configuration (the default)
ERR_MIN_STEP = 10  # error statistics and growth fits use steps >= this (the first steps are transients)
STATES = ("exp_avg", "exp_avg_sq")
STATE_NAMES = {"exp_avg": "m", "exp_avg_sq": "v"}


@dataclass
class StudyData:
    """What the analyses read of a study.

    Args:
        entries: configuration key -> its entry (``key``, ``label``, ``stage``, ``spec``, ``fix``, ``group``,
            ``overrides``, ``core``), in the study's order.
        rows: configuration key -> the summary rows of its finished runs, by seed.
        records: configuration key -> the probe records of its first seed's run (``analysis.probe``).
        overhead_s: configuration key -> seconds its first seed's run spent in the probe (when recorded).
        base: the study's settings (``study_base.json``: ``base``, ``quick``, ``command``, ...).
    """

    entries: dict[str, dict]
    rows: dict[str, list[dict]]
    records: dict[str, list[dict]] = field(default_factory=dict)
    overhead_s: dict[str, float] = field(default_factory=dict)
    base: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------- layer groups
_DEPTH = re.compile(r"\.(?:h|layers|layer|blocks)\.(\d+)\.")


def layer_group(name: str) -> str:
    """Coarse group of a parameter name: ``wte``/``wpe``/``embedding``, ``h.<i>.attn``, ``h.<i>.mlp``,
    ``h.<i>.norm``, ``head``, ``norm`` or ``other``."""
    m = _DEPTH.search(name)
    low = name.lower()
    if "attn" in low or "attention" in low:
        kind = "attn"
    elif "mlp" in low or "ffn" in low or "feed_forward" in low:
        kind = "mlp"
    elif "ln" in low or "norm" in low:
        kind = "norm"
    elif "wte" in low:
        kind = "wte"
    elif "wpe" in low:
        kind = "wpe"
    elif "embed" in low:
        kind = "embedding"
    elif "lm_head" in low or "head" in low:
        kind = "head"
    else:
        kind = "other"
    return f"h.{m.group(1)}.{kind}" if m else kind


def layer_depth(name: str) -> int | None:
    m = _DEPTH.search(name)
    return int(m.group(1)) if m else None


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) if xs else None


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _quantized_names(records: list[dict]) -> set[str]:
    meta = next((r for r in records if r.get("kind") == "meta"), None)
    if meta is None:
        return {r["param"] for r in records if r.get("kind") == "state" and r.get("numel", 0) >= QUANT_MIN_NUMEL}
    return {p["name"] for p in meta["params"] if p["numel"] >= QUANT_MIN_NUMEL}


def error_summary(records: list[dict]) -> dict:
    """Per state (m, v): time-mean and final relative error over the large (quantizable) matrices, the
    growth exponents of the total absolute and the mean relative error."""
    names = _quantized_names(records)
    out = {}
    for s in STATES:
        ser = error_series(records, s, lambda n: n in names)
        pts = [(st, a, r) for st, a, r in zip(ser["steps"], ser["err_l2"], ser["err_rel_l2"]) if st >= ERR_MIN_STEP]
        if not ser["steps"]:
            continue
        out[STATE_NAMES[s]] = {
            "first_step": ser["steps"][0], "first_rel": ser["err_rel_l2"][0],
            "mean_rel": _mean([p[2] for p in pts]), "final_rel": ser["err_rel_l2"][-1], "final_step": ser["steps"][-1],
            "growth_abs": growth_exponent([p[0] for p in pts], [p[1] for p in pts]),
            "growth_rel": growth_exponent([p[0] for p in pts], [p[2] for p in pts]),
            "series": {"steps": ser["steps"], "rel": ser["err_rel_l2"], "abs": ser["err_l2"]},
        }  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------ analysis
def _reference_loss(key: str, e: dict, study: StudyData, fp32_loss: float | None) -> float | None:
    """The val loss a configuration's gap is measured against: fp32 AdamW at the base setting; fp32 at the same
    learning rate / steps for the lr and escalation stages; the all-fp32 run of the same class for sensitivity."""
    rows, entries = study.rows, study.entries
    if e["stage"] in ("lr", "escalation") and e.get("overrides"):
        twin = next((k for k, x in entries.items() if x["spec"] == "adamw" and x.get("overrides") == e["overrides"]), None)
        return _mean([r["final_val_loss"] for r in rows.get(twin, []) if not r["diverged"]]) if twin else None
    if e["stage"] == "sensitivity":
        return _mean([r["final_val_loss"] for r in rows.get("sens:none", []) if not r["diverged"]])
    return fp32_loss


def _config_summary(key: str, e: dict, study: StudyData, fp32_loss: float | None) -> dict:
    """One configuration's numbers: runs, divergence, final val loss (mean, std), gap, state bytes, errors."""
    rs = study.rows.get(key, [])
    ok = [r for r in rs if not r["diverged"]]
    val = _mean([r["final_val_loss"] for r in ok])
    sd = statistics.stdev([r["final_val_loss"] for r in ok]) if len(ok) > 1 else None
    ref = _reference_loss(key, e, study, fp32_loss)
    overhead = None
    r0 = rs[0] if rs else None
    if study.overhead_s.get(key) is not None and r0 and r0.get("step_time_ms") and r0["steps"]:
        overhead = study.overhead_s[key] / (r0["step_time_ms"] / 1e3 * r0["steps"])
    errors = error_summary(study.records.get(key, []))
    return {
        "key": key, "label": e["label"], "stage": e["stage"], "spec": e["spec"], "fix": e.get("fix"),
        "group": e.get("group"), "overrides": e.get("overrides") or {},
        "runs": len(rs), "diverged": len(rs) - len(ok),
        "diverged_at_steps": [r["diverged_at_step"] for r in rs if r["diverged"]],
        "initial_loss": _mean([r["initial_loss"] for r in rs]),
        "final_val_loss": val, "final_val_loss_std": sd,
        "gap_pct": (val / ref - 1) * 100 if val is not None and ref else None,
        "state_bytes_per_param": _mean([r["state_bytes_per_param"] for r in rs]),
        "state_bytes": _mean([r["state_bytes"] for r in rs]),
        "step_time_ms": _mean([r["step_time_ms"] for r in rs]),
        "errors": {k: {kk: vv for kk, vv in v.items() if kk != "series"} for k, v in errors.items()},
        "probe_overhead_frac": overhead,
    }  # fmt: skip


def analyze(study: StudyData) -> dict:
    """Every number of the report (``characterization.json`` without the rendered sentences and figures).

    Args:
        study: the study's configurations, runs and probe records.

    Returns:
        ``{"format", "setting", "quick", "command", "fp32_val_loss", "configs": [per configuration],
        "answers": {naive, distributions, error_growth, fixes, correction, learned, layers, correlation,
        sharpness}}``.
    """
    records = study.records
    fp32_loss = _mean([r["final_val_loss"] for r in study.rows.get("fp32", []) if not r["diverged"]])
    configs = [_config_summary(key, e, study, fp32_loss) for key, e in study.entries.items()]
    by_key = {c["key"]: c for c in configs}
    answers = {
        "naive": _naive_answer(by_key, records, study.entries),
        "distributions": _distribution_answer(records.get("fp32", [])),
        "error_growth": _growth_answer(by_key),
        "fixes": _fix_answer(by_key),
        "correction": _correction_answer(by_key, records),
        "learned": _learned_answer(by_key, records),
        "layers": _layer_answer(by_key, records),
        "correlation": _correlation_answer(by_key),
        "sharpness": _sharpness_answer(records),
    }
    base = study.base
    return {"format": FORMAT, "setting": base.get("base"), "quick": base.get("quick"), "command": base.get("command"),
            "fp32_val_loss": fp32_loss, "configs": configs, "answers": answers}  # fmt: skip


def _per_step(records: list[dict], kind: str) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for r in records:
        if r.get("kind") == kind:
            out.setdefault(r["step"], []).append(r)
    return out


def _naive_answer(by_key, records, entries) -> dict:
    n = by_key.get("naive4")
    if n is None or not n["runs"]:
        return {"measured": False}
    ans = {"measured": True, "runs": n["runs"], "diverged": n["diverged"], "diverged_at_steps": n["diverged_at_steps"],
           "gap_pct": n["gap_pct"], "final_val_loss": n["final_val_loss"]}  # fmt: skip
    ans["other_lrs"] = [{"lr": c["overrides"].get("lr"), "steps": c["overrides"].get("steps"), "diverged": c["diverged"],
                         "diverged_at_steps": c["diverged_at_steps"], "gap_pct": c["gap_pct"], "stage": c["stage"]}
                        for c in by_key.values() if c["key"].startswith("naive4@")]  # fmt: skip
    recs, ref = records.get("naive4", []), records.get("fp32", [])
    names = _quantized_names(recs)
    layers, ref_layers = _per_step(recs, "layer"), _per_step(ref, "layer")
    states = _per_step(recs, "state")
    steps = sorted(s for s in layers if any(r.get("update_ratio") is not None for r in layers[s]))
    if not steps:
        return ans
    first, last = steps[0], steps[-1]
    ans["first_step"], ans["last_step_before_divergence"] = first, last
    per_state = {}
    for s in STATES:
        rs = [r for r in states.get(first, []) if r["state"] == s and r["param"] in names]
        per_state[STATE_NAMES[s]] = {"flushed_frac": _mean([r.get("flushed_frac") for r in rs]),
                                     "err_rel_l2": _mean([r.get("err_rel_l2") for r in rs])}  # fmt: skip
    big = [r for r in layers[first] if r["param"] in names]
    for s in ("m", "v"):
        per_state[s]["update_err_from_state"] = _median([r.get(f"update_err_from_{s}") for r in big])
    ans["state_errors_at_first_step"] = per_state
    ans["update_err_at_first_step"] = _median([r.get("update_err") for r in big])
    if all(per_state[s]["update_err_from_state"] is not None for s in ("m", "v")):
        ans["state_failing_first"] = max(("m", "v"), key=lambda s: per_state[s]["update_err_from_state"])
    ans["zero_v_nonzero_m_frac_at_first_step"] = _mean([r.get("zero_v_nonzero_m_frac") for r in big])
    # the first step whose update used stored states is step 2: compare update ratios there with fp32's
    cmp_step = next((st for st in steps if st >= 2), first)
    ans["compare_step"] = cmp_step
    ratios = []
    ref_by = {r["param"]: r for r in ref_layers.get(cmp_step, [])}
    first_by = {r["param"]: r for r in layers[first]}
    for r in layers[cmp_step]:
        fr = ref_by.get(r["param"], {}).get("update_ratio")
        if r["param"] in names and r.get("update_ratio") is not None and fr:
            ratios.append({"param": r["param"], "update_ratio": r["update_ratio"], "fp32_update_ratio": fr,
                           "x_fp32": r["update_ratio"] / fr if math.isfinite(r["update_ratio"]) else float("inf"),
                           "update_err_after_step1": first_by.get(r["param"], {}).get("update_err"),
                           "zero_v_nonzero_m_frac": first_by.get(r["param"], {}).get("zero_v_nonzero_m_frac")})  # fmt: skip
    ratios.sort(key=lambda x: -x["x_fp32"])
    ans["layers_by_update_blowup"] = ratios
    return ans


def _distribution_answer(recs: list[dict]) -> dict:
    if not recs:
        return {"measured": False}
    names = _quantized_names(recs)
    states = _per_step(recs, "state")
    steps = sorted(states)
    out = {"measured": True, "steps": steps}
    for s in STATES:
        series = {}
        for key in ("kurtosis", "absmax_over_std", "outlier_frac", "top_persistence", "zero_frac"):
            series[key] = [_median([r.get(key) for r in states[st] if r["state"] == s and r["param"] in names]) for st in steps]
        pers = [v for st, v in zip(steps, series["top_persistence"]) if v is not None and st >= ERR_MIN_STEP]
        k = [v for v in series["kurtosis"] if v is not None]
        out[STATE_NAMES[s]] = {
            "kurtosis_first": k[0] if k else None, "kurtosis_final": k[-1] if k else None,
            "kurtosis_max": max(k) if k else None,
            "absmax_over_std_final": series["absmax_over_std"][-1] if series["absmax_over_std"] else None,
            "outlier_frac_final": series["outlier_frac"][-1] if series["outlier_frac"] else None,
            "outlier_frac_mean": _mean(series["outlier_frac"]),
            "top_persistence_mean": _mean(pers), "series": series,
        }  # fmt: skip
    meta = next((r for r in recs if r.get("kind") == "meta"), {})
    out["outlier_top"] = meta.get("outlier_top", 1e-3)
    out["probe_gap_steps"] = meta.get("every")
    return out


def _growth_answer(by_key) -> dict:
    out = {}
    for c in by_key.values():
        if c["stage"] in ("sensitivity", "control") or c["diverged"] or not c["errors"]:
            continue
        if c["key"] == "fp32":
            continue
        entry = {}
        for s, e in c["errors"].items():
            entry[s] = {"alpha_abs": (e.get("growth_abs") or {}).get("alpha"), "alpha_rel": (e.get("growth_rel") or {}).get("alpha"),
                        "r2_abs": (e.get("growth_abs") or {}).get("r2"), "mean_rel": e.get("mean_rel"), "final_rel": e.get("final_rel")}  # fmt: skip
            entry[s]["kind_abs"] = growth_kind(entry[s]["alpha_abs"])
            entry[s]["kind_rel"] = growth_kind(entry[s]["alpha_rel"])
        out[c["key"]] = entry
    return out


def _fix_answer(by_key) -> dict:
    stage1 = [{"fix": c["fix"], "label": c["label"] if c["stage"] == "fix" else "naive 4-bit + zero-free v map (linear, no zero level)",
               "diverged": c["diverged"], "runs": c["runs"], "diverged_at_steps": c["diverged_at_steps"], "gap_pct": c["gap_pct"]}
              for c in by_key.values() if c["stage"] == "fix" or c["key"] == "zerofree"]  # fmt: skip
    base = by_key.get("zerofree")
    stage2 = []
    g0 = base["gap_pct"] if base else None
    for c in by_key.values():
        if c["stage"] != "stage2" or c["key"] == "zerofree":
            continue
        rec = None
        if g0 is not None and c["gap_pct"] is not None and g0 > 0:
            rec = (g0 - c["gap_pct"]) / g0 * 100
        stage2.append({"fix": c["fix"], "label": c["label"], "diverged": c["diverged"], "gap_pct": c["gap_pct"],
                       "recovered_pct_of_gap": rec})  # fmt: skip
    stage2.sort(key=lambda x: -(x["recovered_pct_of_gap"] if x["recovered_pct_of_gap"] is not None else -1e9))
    combined = [{"key": c["key"], "label": c["label"], "diverged": c["diverged"], "gap_pct": c["gap_pct"],
                 "state_bytes_per_param": c["state_bytes_per_param"]} for c in by_key.values() if c["stage"] == "combined"]  # fmt: skip
    return {"stage1": stage1, "zero_free_base_gap_pct": g0, "zero_free_base_diverged": base["diverged"] if base else None,
            "stage2": stage2, "combined": combined}  # fmt: skip


def _correction_answer(by_key, records) -> dict:
    out = {"runs": []}
    for key in ("zerofree", "zerofree+ec10", "zerofree+ec100", "zerofree+ec1000", "8bit", "naive4", "naive+ec10",
                "naive+ec100", "naive+ec1000"):  # fmt: skip
        c = by_key.get(key)
        if c is None or not c["runs"]:
            continue
        m = c["errors"].get("m", {})
        tracking = [r.get("residual_tracking_err") for r in records.get(key, []) if r.get("kind") == "state"
                    and r.get("state") == "exp_avg" and r.get("step", 0) >= ERR_MIN_STEP]  # fmt: skip
        out["runs"].append({"key": key, "label": c["label"], "diverged": c["diverged"], "diverged_at_steps": c["diverged_at_steps"],
                            "gap_pct": c["gap_pct"], "m_mean_rel_err": m.get("mean_rel"), "m_final_rel_err": m.get("final_rel"),
                            "m_alpha_abs": (m.get("growth_abs") or {}).get("alpha"),
                            "residual_tracking_err": _median(tracking),
                            "state_bytes_per_param": c["state_bytes_per_param"]})  # fmt: skip
    return out


def _learned_answer(by_key, records) -> dict:
    out = []
    for key in ("zerofree", "zerofree+learned", "naive+learned", "default4", "all_fixes", "all_learned", "8bit"):
        c = by_key.get(key)
        if c is None or not c["runs"]:
            continue
        out.append({"key": key, "label": c["label"], "diverged": c["diverged"], "gap_pct": c["gap_pct"],
                    "m_mean_rel_err": c["errors"].get("m", {}).get("mean_rel"),
                    "v_mean_rel_err": c["errors"].get("v", {}).get("mean_rel"),
                    "state_bytes_per_param": c["state_bytes_per_param"]})  # fmt: skip
    levels = {}
    for key in ("zerofree+learned", "all_learned"):
        recs = [r for r in records.get(key, []) if r.get("kind") == "state" and "levels" in r]
        if recs:
            last = max(r["step"] for r in recs)
            big = max((r for r in recs if r["step"] == last), key=lambda r: r["numel"])
            levels[key] = {"step": last, "param": big["param"],
                           **{STATE_NAMES.get(r["state"], r["state"]): r["levels"] for r in recs if r["step"] == last and r["param"] == big["param"]}}  # fmt: skip
    return {"runs": out, "final_levels": levels}


def _layer_answer(by_key, records) -> dict:
    out = {}
    for key in ("zerofree", "default4", "8bit"):
        recs = records.get(key, [])
        if not recs or by_key.get(key, {}).get("diverged"):
            continue
        names = _quantized_names(recs)
        per: dict[str, dict[str, list[float]]] = {}
        for r in recs:
            if r.get("kind") == "state" and r["param"] in names and r.get("err_rel_l2") is not None and r["step"] >= ERR_MIN_STEP:
                per.setdefault(r["param"], {}).setdefault(STATE_NAMES.get(r["state"], r["state"]), []).append(r["err_rel_l2"])
        layers = [{"param": p, "group": layer_group(p), "depth": layer_depth(p), **{s: _mean(v) for s, v in d.items()}} for p, d in per.items()]
        depths = sorted({x["depth"] for x in layers if x["depth"] is not None})
        by_depth = {d: {s: _mean([x.get(s) for x in layers if x["depth"] == d]) for s in ("m", "v")} for d in depths}
        kinds = {}
        for x in layers:
            kind = x["group"].split(".")[-1]
            kinds.setdefault(kind, []).append(x)
        by_kind = {k: {s: _mean([x.get(s) for x in v]) for s in ("m", "v")} for k, v in kinds.items()}
        out[key] = {"layers": layers, "by_depth": by_depth, "by_kind": by_kind}
    sens = [{"group": c["group"], "label": c["label"], "diverged": c["diverged"], "diverged_at_steps": c["diverged_at_steps"],
             "gap_pct": c["gap_pct"]} for c in by_key.values() if c["stage"] == "sensitivity" and c["group"] != "none"]  # fmt: skip
    sens.sort(key=lambda x: (x["diverged"] == 0, -(x["gap_pct"] if x["gap_pct"] is not None else 1e9)))
    base = by_key.get("sens:none")
    return {"errors": out, "sensitivity": sens, "sensitivity_baseline_val_loss": base["final_val_loss"] if base else None}


def _correlation_answer(by_key) -> dict:
    xs_m, xs_v, ys, keys = [], [], [], []
    for c in by_key.values():
        if c["stage"] in ("sensitivity", "lr", "escalation", "control") or c["diverged"] or c["key"] == "fp32" or c["gap_pct"] is None:
            continue
        if not c["errors"]:
            continue
        keys.append(c["key"])
        xs_m.append(c["errors"].get("m", {}).get("mean_rel"))
        xs_v.append(c["errors"].get("v", {}).get("mean_rel"))
        ys.append(c["gap_pct"])
    return {"configs": keys, "spearman_m_err_vs_gap": spearman(xs_m, ys), "spearman_v_err_vs_gap": spearman(xs_v, ys),
            "n": len(keys)}  # fmt: skip


def _sharpness_answer(records) -> dict:
    out = {}
    for key, recs in records.items():
        pts = [(r["step"], r["eigenvalue"]) for r in recs if r.get("kind") == "sharpness" and r.get("eigenvalue") is not None]
        if pts:
            out[key] = {"steps": [p[0] for p in pts], "eigenvalue": [p[1] for p in pts]}
    return out
