"""The report of ``effopt characterize``: numbers, plain-sentence answers, figures.

Everything is recomputed from the files of the study folder (``study.json``, ``study_base.json``,
``plan.json``, each run's ``result.json``, ``metrics.jsonl`` and ``probes.jsonl``), so
``effopt characterize --report-only --out DIR`` rebuilds it from a finished, interrupted or copied folder.
Writes ``report.md``, ``characterization.json`` and ``fig_*.png``.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from ..analysis.probe import error_series, read_probes
from ..analysis.stats import growth_exponent, growth_kind, spearman
from .metrics import MetricsLog, write_json_atomic
from .runner import collect_summary, load_plan

FORMAT = "efficient_optim.characterization/1"
QUANT_MIN_NUMEL = 4096  # parameters below this keep fp32 states in every configuration (the default)
ERR_MIN_STEP = 10  # error statistics and growth fits use steps >= this (the first steps are transients)
STATES = ("exp_avg", "exp_avg_sq")
STATE_NAMES = {"exp_avg": "m", "exp_avg_sq": "v"}


# ------------------------------------------------------------------------------------------ loading
def load_entries(out: Path) -> dict[str, dict]:
    return {e["key"]: e for e in json.loads((out / "study.json").read_text())["entries"]}


def load_rows(out: Path) -> dict[str, list[dict]]:
    """Entry key -> result rows of its finished runs (by seed)."""
    rows: dict[str, list[dict]] = {}
    for c in load_plan(out):
        f = out / c.run_id / "result.json"
        if f.is_file():
            rows.setdefault(c.settings, []).append(json.loads(f.read_text()))
    for v in rows.values():
        v.sort(key=lambda r: r["seed"])
    return rows


def _run_dirs(out: Path) -> dict[str, list[Path]]:
    dirs: dict[str, list[Path]] = {}
    for c in sorted(load_plan(out), key=lambda c: c.seed):
        dirs.setdefault(c.settings, []).append(out / c.run_id)
    return dirs


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) if xs else None


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _pct(x, digits=2):
    return "n/a" if x is None else f"{x:+.{digits}f} %"


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


def _loss_curve(run_dir: Path) -> tuple[list[int], list[float]]:
    recs = MetricsLog(run_dir / "metrics.jsonl").read()
    pts = [(r["step"], r["train_loss"]) for r in recs if r.get("kind") == "train"]
    return [p[0] for p in pts], [p[1] for p in pts]


# ------------------------------------------------------------------------------------------ analysis
def analyze(out: Path) -> dict:
    """Every number of the report (``characterization.json``)."""
    entries = load_entries(out)
    rows = load_rows(out)
    dirs = _run_dirs(out)
    base = json.loads((out / "study_base.json").read_text()) if (out / "study_base.json").is_file() else {}
    records = {k: read_probes(d[0] / "probes.jsonl") for k, d in dirs.items() if d}
    fp32_rows = [r for r in rows.get("fp32", []) if not r["diverged"]]
    fp32_loss = _mean([r["final_val_loss"] for r in fp32_rows])

    configs = []
    for key, e in entries.items():
        rs = rows.get(key, [])
        ok = [r for r in rs if not r["diverged"]]
        val = _mean([r["final_val_loss"] for r in ok])
        sd = statistics.stdev([r["final_val_loss"] for r in ok]) if len(ok) > 1 else None
        ref = fp32_loss
        if e["stage"] in ("lr", "escalation") and e.get("overrides"):
            twin = next((k for k, x in entries.items() if x["spec"] == "adamw" and x.get("overrides") == e["overrides"]), None)
            ref = _mean([r["final_val_loss"] for r in rows.get(twin, []) if not r["diverged"]]) if twin else None
        if e["stage"] == "sensitivity":
            ref = _mean([r["final_val_loss"] for r in rows.get("sens:none", []) if not r["diverged"]])
        overhead = None
        if dirs.get(key):
            f = dirs[key][0] / "probe_overhead.json"
            r0 = rs[0] if rs else None
            if f.is_file() and r0 and r0.get("step_time_ms") and r0["steps"]:
                overhead = json.loads(f.read_text())["probe_overhead_s"] / (r0["step_time_ms"] / 1e3 * r0["steps"])
        configs.append({
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
            "errors": {k: {kk: vv for kk, vv in v.items() if kk != "series"} for k, v in error_summary(records.get(key, [])).items()},
            "probe_overhead_frac": overhead,
        })  # fmt: skip
    by_key = {c["key"]: c for c in configs}
    answers = {
        "naive": _naive_answer(by_key, records, entries),
        "distributions": _distribution_answer(records.get("fp32", [])),
        "error_growth": _growth_answer(by_key),
        "fixes": _fix_answer(by_key),
        "correction": _correction_answer(by_key, records),
        "learned": _learned_answer(by_key, records),
        "layers": _layer_answer(by_key, records),
        "correlation": _correlation_answer(by_key),
        "sharpness": _sharpness_answer(records),
    }
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
    from .characterize import layer_depth, layer_group

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


# ---------------------------------------------------------------------------------- synthetic P5
def p5_synthetic(steps: int = 2000, numel: int = 8192, seed: int = 0, ks=(10, 100, 1000), record_every: int = 10) -> dict:
    """P5 on a synthetic gradient sequence: EMA states (m: beta 0.9, v: beta 0.999) stored with the naive
    4-bit codecs (linear maps, blocks of 2048, nearest rounding), with and without error correction every K
    steps (8-bit residual), against the exact fp32 EMA of the same gradients. Gradients: a fixed per-
    coordinate mean plus Student-t noise (3 degrees of freedom: heavy-tailed), with log-normal per-coordinate
    scales. Returns the relative L2 error of each stored state over steps."""
    import torch

    from ..state.corrected import ErrorCorrected
    from ..state.quantized import Quantized

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


# --------------------------------------------------------------------------------------- sentences
def sentences(a: dict) -> dict[str, list[str]]:
    """Plain-sentence answers to the study's questions, with the numbers."""
    by_key = {c["key"]: c for c in a["configs"]}
    ans = a["answers"]
    S: dict[str, list[str]] = {}
    fp32 = a.get("fp32_val_loss")
    fp = f"{fp32:.4f}" if fp32 is not None else "n/a"

    n = ans["naive"]
    lines = []
    if not n.get("measured"):
        lines.append("Naive 4-bit was not run.")
    elif n["diverged"]:
        steps = ", ".join(str(s) for s in n["diverged_at_steps"])
        lines.append(f"**Yes.** Naive 4-bit (linear maps, v map with a zero level, blocks of 2048, round-to-nearest) "
                     f"diverges in {n['diverged']}/{n['runs']} run(s), at step {steps} (training loss above twice the "
                     f"first step's), where fp32 AdamW reaches a validation loss of {fp}.")  # fmt: skip
    else:
        lines.append(f"**No divergence here.** Naive 4-bit trains to a validation loss of {n['final_val_loss']:.4f}, "
                     f"{_pct(n['gap_pct'])} against fp32 AdamW ({fp}).")  # fmt: skip
    for o in n.get("other_lrs", []):
        what = f"lr {o['lr']:g}" if o.get("lr") is not None else f"{o['steps']} steps"
        if o["diverged"]:
            lines.append(f"At {what} it diverges as well (step {', '.join(map(str, o['diverged_at_steps']))}).")
        else:
            lines.append(f"At {what} it does not diverge (val-loss gap {_pct(o['gap_pct'])} against fp32 at the same setting).")
    if n.get("state_errors_at_first_step"):
        m, v = n["state_errors_at_first_step"].get("m", {}), n["state_errors_at_first_step"].get("v", {})
        lines.append(
            f"How: after the first step, {100 * (v.get('flushed_frac') or 0):.1f} % of v's entries in the quantized matrices "
            f"are stored as exactly 0 although the true v is not (m: {100 * (m.get('flushed_frac') or 0):.1f} %), and "
            f"{100 * (n.get('zero_v_nonzero_m_frac_at_first_step') or 0):.1f} % of the entries have v = 0 but m != 0: their "
            "next update is lr * m_hat / eps (eps = 1e-8), orders of magnitude above lr.")  # fmt: skip
        um, uv = m.get("update_err_from_state"), v.get("update_err_from_state")
        if um is not None and uv is not None:
            lines.append(f"Which state fails first: the Adam direction m_hat / (sqrt(v_hat) + eps) built from the stored "
                         f"states is off by {n['update_err_at_first_step']:.3g}x its own norm after step 1 (median over the "
                         f"quantized matrices); storing only m costs {um:.3g}x, storing only v {uv:.3g}x: **{n['state_failing_first']}** "
                         f"fails first (relative L2 error of the states themselves: m {m.get('err_rel_l2') or 0:.2f}, v "
                         f"{v.get('err_rel_l2') or 0:.2f}).")  # fmt: skip
        top = n.get("layers_by_update_blowup", [])[:3]
        if top:
            lines.append(f"Layers failing first (update-to-parameter ratio at step {n['compare_step']}, the first step that "
                         "uses stored states, against fp32's at the same step): "
                         + "; ".join(f"`{t['param']}` {t['x_fp32']:.3g}x ({t['update_ratio']:.3g} vs {t['fp32_update_ratio']:.3g})" for t in top)
                         + ".")  # fmt: skip
    S["Does naive 4-bit fail here, and how?"] = lines

    d = ans["distributions"]
    lines = []
    if d.get("measured"):
        for s in ("m", "v"):
            x = d.get(s, {})
            if x.get("kurtosis_final") is None:
                continue
            shape = "close to Gaussian" if x["kurtosis_final"] < 4 else ("heavy-tailed" if x["kurtosis_final"] < 20 else "very heavy-tailed")
            lines.append(f"{s} (fp32 run, median over the quantizable matrices): kurtosis {x['kurtosis_first']:.1f} at the first probe, "
                         f"{x['kurtosis_final']:.1f} at the end (max {x['kurtosis_max']:.1f}; Gaussian = 3): {shape}; max|x|/std "
                         f"{x['absmax_over_std_final']:.1f} at the end; {100 * (x['outlier_frac_mean'] or 0):.3f} % of entries beyond "
                         f"6 std on average (a Gaussian: 2e-7 %).")  # fmt: skip
        pm, pv = d.get("m", {}).get("top_persistence_mean"), d.get("v", {}).get("top_persistence_mean")
        if pm is not None or pv is not None:
            chance = 100 * d.get("outlier_top", 1e-3)
            verdict = "**Outliers persist**" if (pv or 0) > 0.5 or (pm or 0) > 0.5 else "**Outliers mostly move**"
            lines.append(f"{verdict}: of the top {chance:g} % largest-magnitude positions at one probe, "
                         f"{100 * (pv or 0):.0f} % (v) and {100 * (pm or 0):.0f} % (m) are again in the top {chance:g} % "
                         f"{d.get('probe_gap_steps')} steps later (chance: {chance:g} %).")  # fmt: skip
    S["Are the states Gaussian, and do outliers persist?"] = lines or ["Not measured (no fp32 run with probes)."]

    g = ans["error_growth"]
    lines = []
    for key in ("8bit", "default4", "zerofree", "all_fixes", "zerofree+ec10", "zerofree+learned"):
        if key not in g:
            continue
        parts = []
        for s in ("m", "v"):
            e = g[key].get(s)
            if e and e["alpha_abs"] is not None:
                parts.append(f"{s}: absolute error alpha = {e['alpha_abs']:.2f} ({e['kind_abs']}), relative error alpha = "
                             f"{e['alpha_rel']:.2f} ({e['kind_rel']}), mean relative error {e['mean_rel']:.3f}")  # fmt: skip
        if parts:
            lines.append(f"{by_key[key]['label']}: " + "; ".join(parts) + ".")
    if lines:
        lines.insert(0, "Growth of the error of the stored states against the exact fp32 shadow (fit error ~ step^alpha over "
                        f"steps >= {ERR_MIN_STEP}; alpha ~ 1 linear, 0.2-0.8 sub-linear, < 0.2 bounded):")  # fmt: skip
    c = ans["correlation"]
    if c.get("n", 0) >= 3:
        lines.append(f"Across the {c['n']} non-diverged quantized configurations, the time-mean relative error correlates with the "
                     f"val-loss gap with Spearman rho = {c['spearman_m_err_vs_gap'] if c['spearman_m_err_vs_gap'] is not None else float('nan'):.2f} (m) "
                     f"and {c['spearman_v_err_vs_gap'] if c['spearman_v_err_vs_gap'] is not None else float('nan'):.2f} (v).")  # fmt: skip
    S["Does the error grow linearly or sub-linearly?"] = lines or ["Not measured."]

    f = ans["fixes"]
    lines = []
    for x in f["stage1"]:
        if x["diverged"]:
            lines.append(f"{x['label']}: still diverges (step {', '.join(map(str, x['diverged_at_steps']))}).")
        else:
            lines.append(f"{x['label']}: trains; val-loss gap {_pct(x['gap_pct'])}.")
    if f.get("zero_free_base_gap_pct") is not None:
        lines.append(f"On the zero-free base (naive 4-bit with a zero-free linear v map: gap {_pct(f['zero_free_base_gap_pct'])}), "
                     "adding one fix at a time:")  # fmt: skip
        for x in f["stage2"]:
            if x["diverged"]:
                lines.append(f"  - {x['label']}: diverges.")
            else:
                rec = x["recovered_pct_of_gap"]
                lines.append(f"  - {x['label']}: gap {_pct(x['gap_pct'])}"
                             + (f", recovers {rec:.0f} % of the base's gap." if rec is not None else "."))  # fmt: skip
    for x in f["combined"]:
        lines.append(f"Combined — {x['label']}: " + ("diverges." if x["diverged"] else
                     f"gap {_pct(x['gap_pct'])} at {x['state_bytes_per_param']:.3f} B/param of state."))  # fmt: skip
    S["Which fix recovers how much?"] = lines or ["Not measured."]

    co = ans["correction"]["runs"]
    lines = []
    for x in co:
        if x["diverged"]:
            lines.append(f"{x['label']}: diverges (step {', '.join(map(str, x['diverged_at_steps']))}).")
        else:
            t = f", the residual tracks the true error within {100 * x['residual_tracking_err']:.0f} %" if x.get("residual_tracking_err") is not None else ""
            lines.append(f"{x['label']}: time-mean relative error of m {x['m_mean_rel_err']:.3f}" if x["m_mean_rel_err"] is not None else f"{x['label']}:")
            lines[-1] += f", gap {_pct(x['gap_pct'])}, {x['state_bytes_per_param']:.3f} B/param{t}."
    syn = a.get("p5_synthetic")
    if syn:
        st = syn["setting"]
        for case, beta in (("m", 0.9), ("v", 0.999)):
            late = syn.get(case + "_late_mean", {})
            if late:
                lines.append(f"Synthetic sequence ({st['steps']} steps, {st['numel']} coordinates, {st['gradients']}; {st['codecs']}), "
                             f"{case} (beta {beta}): mean relative error over the second half "
                             + ", ".join(f"{k}: {v:.3f}" for k, v in late.items()) + ".")  # fmt: skip
    S["P5: does error correction every K steps help?"] = lines or ["Not measured."]

    le = ans["learned"]["runs"]
    lines = []
    for x in le:
        if x["diverged"]:
            lines.append(f"{x['label']}: diverges.")
        else:
            lines.append(f"{x['label']}: gap {_pct(x['gap_pct'])}; mean relative error m {x['m_mean_rel_err'] or 0:.3f}, v "
                         f"{x['v_mean_rel_err'] or 0:.3f}; {x['state_bytes_per_param']:.3f} B/param.")  # fmt: skip
    S["P6: learned codebooks vs uniform and dynamic maps"] = lines or ["Not measured."]

    la = ans["layers"]
    lines = []
    for key, e in la["errors"].items():
        bd = e["by_depth"]
        if len(bd) >= 2:
            ds = sorted(bd)
            lines.append(f"{by_key[key]['label']}: mean relative error by depth (m / v): "
                         + ", ".join(f"layer {dd}: {bd[dd]['m'] or 0:.3f} / {bd[dd]['v'] or 0:.3f}" for dd in ds)
                         + "; by kind: " + ", ".join(f"{k} {v['m'] or 0:.3f} / {v['v'] or 0:.3f}" for k, v in sorted(e["by_kind"].items())) + ".")  # fmt: skip
    if la["sensitivity"]:
        parts = []
        for x in la["sensitivity"]:
            parts.append(f"{x['group']}: " + (f"diverges (step {', '.join(map(str, x['diverged_at_steps']))})" if x["diverged"] else _pct(x["gap_pct"])))
        lines.append("Per-layer sensitivity (one group at 4 bits, the rest fp32; val-loss gap against the all-fp32 run of the "
                     "same optimizer), most sensitive first: " + "; ".join(parts) + ".")  # fmt: skip
        tol = [x for x in la["sensitivity"] if not x["diverged"] and x["gap_pct"] is not None and x["gap_pct"] < 0.5]
        if tol:
            lines.append("Groups that tolerate 4 bits (gap < 0.5 %): " + ", ".join(x["group"] for x in tol) + ".")
    S["Which layers fail first: early vs late, attention vs MLP vs embeddings?"] = lines or ["Not measured."]

    ctrl = [c for c in a["configs"] if c["stage"] == "control" and c["runs"]]
    if ctrl:
        S["Context: how far does the learning rate alone move fp32?"] = [
            f"{c['label']}: " + ("diverges." if c["diverged"] else f"val loss {c['final_val_loss']:.4f}, {_pct(c['gap_pct'])} against "
                                 f"fp32 at the base learning rate ({fp}).") for c in ctrl]  # fmt: skip
    sh = ans["sharpness"]
    lines = []
    for key, v in sh.items():
        lines.append(f"{by_key[key]['label'] if key in by_key else key}: top Hessian eigenvalue "
                     + ", ".join(f"{e:.1f} (step {s})" for s, e in zip(v["steps"], v["eigenvalue"])) + ".")  # fmt: skip
    if lines:
        S["Sharpness (top Hessian eigenvalue, power iteration on one fixed batch)"] = lines
    return S


# ------------------------------------------------------------------------------------------ figures
def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        return None


def figures(out: Path, a: dict) -> list[Path]:
    plt = _plt()
    if plt is None:
        return []
    dirs = _run_dirs(out)
    by_key = {c["key"]: c for c in a["configs"]}
    paths = []

    # 1. loss curves: core + stage 1 | stage 2 + combined
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    panels = [("core", "fix"), ("stage2", "combined")]
    for ax, stages in zip(axes, panels):
        for c in a["configs"]:
            if c["stage"] not in stages and not (c["key"] == "fp32"):
                continue
            if c["key"] not in dirs:
                continue
            steps, loss = _loss_curve(dirs[c["key"]][0])
            if not steps:
                continue
            line = ax.plot(steps, loss, label=c["label"][:60], linewidth=1)[0]
            if c["diverged"]:
                ax.plot([steps[-1]], [loss[-1]], "x", color=line.get_color(), markersize=8)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_yscale("log")
        ax.legend(fontsize=6)
    axes[0].set_title("fp32, 8-bit, naive 4-bit and each fix alone (x: diverged)", fontsize=9)
    axes[1].set_title("zero-free base + each fix; combined", fontsize=9)
    fig.tight_layout()
    paths.append(out / "fig_loss.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # 2. error over time (m, v) for non-diverged quantized configs
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    records = {k: read_probes(d[0] / "probes.jsonl") for k, d in dirs.items() if d}
    drew = False
    for ax, s in zip(axes, STATES):
        for c in a["configs"]:
            if c["stage"] in ("sensitivity", "lr", "escalation", "control") or c["key"] == "fp32" or c["diverged"]:
                continue
            es = error_summary(records.get(c["key"], []))
            e = es.get(STATE_NAMES[s])
            if not e:
                continue
            pts = [(st, v) for st, v in zip(e["series"]["steps"], e["series"]["rel"]) if v]
            if pts:
                fit = e.get("growth_rel")
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", linewidth=1,
                        label=f"{c['label'][:45]}" + (f" (a={fit['alpha']:.2f})" if fit else ""))  # fmt: skip
                drew = True
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("mean ||stored - exact|| / ||exact||")
        ax.set_title(f"{STATE_NAMES[s]}: error against the fp32 shadow (a: growth exponent of the relative error)", fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    if drew:
        paths.append(out / "fig_error_growth.png")
        fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # 3. distributions of the fp32 run
    d = a["answers"]["distributions"]
    if d.get("measured"):
        fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
        for s in ("m", "v"):
            ser = d[s]["series"]
            axes[0].plot(d["steps"], ser["kurtosis"], label=s)
            axes[1].plot(d["steps"], [x if x else None for x in ser["outlier_frac"]], label=s)
            axes[2].plot(d["steps"], ser["top_persistence"], label=s)
        axes[0].set_yscale("log")
        axes[0].set_title("kurtosis (median over matrices; Gaussian 3)", fontsize=9)
        axes[1].set_title("fraction of entries beyond 6 std", fontsize=9)
        axes[2].set_title(f"top-{100 * d.get('outlier_top', 1e-3):g} % positions kept since the last probe", fontsize=9)
        for ax in axes:
            ax.set_xlabel("step")
            ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out / "fig_distributions.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
        if "fp32" in dirs:
            from ..analysis.plots import plot_histograms

            p = plot_histograms(records.get("fp32", []), out / "fig_histograms_fp32.png")
            if p:
                paths.append(p)

    # 4. naive failure: per-layer update ratio at the first step vs fp32
    n = a["answers"]["naive"]
    blow = [b for b in (n.get("layers_by_update_blowup") or []) if math.isfinite(b["x_fp32"])]
    if blow:
        fig, ax = plt.subplots(figsize=(8, 0.3 * len(blow) + 1.5))
        ax.barh([b["param"].replace("transformer.", "") for b in blow], [b["x_fp32"] for b in blow])
        ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set_xlabel(f"naive 4-bit update ratio / fp32's at step {n['compare_step']}")
        ax.tick_params(axis="y", labelsize=7)
        fig.tight_layout()
        paths.append(out / "fig_naive_failure.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    # 5. error correction: m error over time
    keys = [k for k in ("zerofree", "zerofree+ec10", "zerofree+ec100", "zerofree+ec1000", "8bit") if k in records and by_key.get(k) and not by_key[k]["diverged"]]
    if keys:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for k in keys:
            e = error_summary(records[k]).get("m")
            if e:
                ax.plot(e["series"]["steps"], e["series"]["rel"], label=by_key[k]["label"][:60], linewidth=1)
        ax.set_xlabel("step")
        ax.set_ylabel("m: mean relative error against the fp32 shadow")
        ax.set_yscale("log")
        ax.set_title("Error correction every K steps (P5)", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "fig_correction.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    syn = a.get("p5_synthetic")
    if syn and syn.get("steps"):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
        for ax, (case, beta) in zip(axes, (("m", 0.9), ("v", 0.999))):
            for name, vals in syn[case].items():
                ax.plot(syn["steps"], vals, label=name, linewidth=1)
            ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.set_ylabel("||stored - exact|| / ||exact||")
            ax.set_title(f"synthetic {case} (EMA beta {beta}), naive 4-bit, with / without correction every K", fontsize=8)
            ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "fig_p5_synthetic.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    # 6. sensitivity and per-depth errors
    la = a["answers"]["layers"]
    if la["sensitivity"]:
        sens = la["sensitivity"]
        fig, ax = plt.subplots(figsize=(7, 0.35 * len(sens) + 1.5))
        vals = [x["gap_pct"] if x["gap_pct"] is not None else 0 for x in sens]
        colors = ["tab:red" if x["diverged"] else "tab:blue" for x in sens]
        ax.barh([x["group"] for x in sens], vals, color=colors)
        ax.invert_yaxis()
        ax.set_xlabel("val-loss gap (%) with this group at 4 bits, the rest fp32 (red: diverged)")
        fig.tight_layout()
        paths.append(out / "fig_sensitivity.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    # 7. sharpness
    sh = a["answers"]["sharpness"]
    if sh:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for k, v in sh.items():
            ax.plot(v["steps"], v["eigenvalue"], "o-", label=by_key[k]["label"][:50] if k in by_key else k)
        ax.set_xlabel("step")
        ax.set_ylabel("top Hessian eigenvalue")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "fig_sharpness.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


# ------------------------------------------------------------------------------------------- report
def _table(a: dict) -> list[str]:
    lines = ["| configuration | stage | runs | diverged (step) | final val loss | gap vs fp32 | state B/param | m rel. err | v rel. err | spec |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in a["configs"]:
        if c["stage"] == "sensitivity":
            continue
        val = "—" if c["final_val_loss"] is None else f"{c['final_val_loss']:.4f}" + (f" ± {c['final_val_loss_std']:.4f}" if c["final_val_loss_std"] else "")
        div = f"{c['diverged']}/{c['runs']}" + (f" ({', '.join(map(str, c['diverged_at_steps']))})" if c["diverged"] else "")
        m = c["errors"].get("m", {}).get("mean_rel")
        v = c["errors"].get("v", {}).get("mean_rel")
        if c["diverged"] == c["runs"]:
            m = c["errors"].get("m", {}).get("first_rel")
            v = c["errors"].get("v", {}).get("first_rel")
        bpp = c["state_bytes_per_param"]
        lines.append(f"| {c['label']} | {c['stage']} | {c['runs']} | {div} | {val} | {_pct(c['gap_pct'])} | "
                     f"{'n/a' if bpp is None else f'{bpp:.3f}'} | {'n/a' if m is None else f'{m:.3f}'} | "
                     f"{'n/a' if v is None else f'{v:.3f}'} | `{c['spec']}` |")  # fmt: skip
    return lines


def _figures_fresh(out: Path) -> list[Path] | None:
    """The existing figures if they are newer than every input file, else None."""
    figs = sorted(out.glob("fig_*.png"))
    if not figs:
        return None
    inputs = [p for pat in ("*/*/seed*/result.json", "*/*/seed*/probes.jsonl", "p5_synthetic.json", "study.json")
              for p in out.glob(pat)]  # fmt: skip
    newest = max((p.stat().st_mtime for p in inputs), default=0.0)
    return figs if min(p.stat().st_mtime for p in figs) >= newest else None


def write_report(out: Path, redraw: bool = True) -> Path:
    """Write ``report.md``, ``characterization.json`` and the figures; returns the report's path.

    ``redraw=False`` keeps the existing figures when no input changed since they were drawn."""
    out = Path(out)
    a = analyze(out)
    if (out / "p5_synthetic.json").is_file():
        a["p5_synthetic"] = json.loads((out / "p5_synthetic.json").read_text())
    S = sentences(a)
    figs = None if redraw else _figures_fresh(out)
    if figs is None:
        figs = figures(out, a)
    a["sentences"] = S
    a["figures"] = [p.name for p in figs]
    summary = collect_summary(out, load_plan(out))
    a["errors"] = summary["errors"]
    a["pending"] = summary["pending"]
    write_json_atomic(out / "characterization.json", a)
    st = a.get("setting") or {}
    lines = ["# Characterization: why low-bit optimizer states fail, and what fixes them", ""]
    if a.get("command"):
        lines += ["Command:", "", f"    {a['command']}", ""]
    if st:
        lines += [f"Model `{st.get('model')}` ({st.get('layers') or 'preset'} layers, width {st.get('width') or 'preset'}), data "
                  f"`{st.get('data')}`, context {st.get('context')}, batch {st.get('batch_size')}, {st.get('steps')} steps, peak lr "
                  f"{st.get('lr')}, warm-up + cosine, clipping {st.get('clip')}. A run diverges when its training loss exceeds "
                  "twice the first step's. Errors are measured against an exact fp32 shadow of each state updated from the "
                  f"same gradients (mean over the matrices of >= {QUANT_MIN_NUMEL} elements, steps >= {ERR_MIN_STEP}; for runs "
                  "that diverged, at the first step). "
                  + ("**Quick mode: a smoke test, not results.**" if a.get("quick") else ""), ""]  # fmt: skip
    for q, ls in S.items():
        lines += [f"## {q}", ""] + [x if x.startswith("  -") else f"- {x}" for x in ls] + [""]
    lines += ["## All configurations", ""] + _table(a) + [""]
    ov = [c["probe_overhead_frac"] for c in a["configs"] if c["probe_overhead_frac"] is not None]
    if ov:
        lines += [f"Probe overhead (shadow states every step, statistics at probe steps, sharpness where on): median "
                  f"{100 * statistics.median(ov):.1f} % of the run's time, max {100 * max(ov):.1f} %.", ""]  # fmt: skip
    if a["errors"]:
        lines += ["## Failed runs", ""] + [f"- `{e['run']}`: {e['error']}" for e in a["errors"]] + [""]
    if a["pending"]:
        lines += ["## Not run yet", "", "Resume with `--resume`: " + ", ".join(f"`{p}`" for p in a["pending"]), ""]
    lines += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figs] + [""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path

