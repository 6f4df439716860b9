"""The plain-sentence answers of the characterization report (``effopt characterize``), with their numbers.

Rendering only: every number comes from ``analysis.characterization.analyze`` (and the synthetic experiment's
``p5_synthetic.json``); ``sentences(a)`` turns it into a question -> lines mapping for ``report.md``.
"""

from __future__ import annotations

from ..analysis.characterization import ERR_MIN_STEP


def pct(x, digits=2):
    return "n/a" if x is None else f"{x:+.{digits}f} %"


def _naive_failure(a: dict, by_key: dict, fp: str) -> list[str]:
    """Lines on how naive 4-bit fails (or not), which state fails first, which layers first."""
    ans = a["answers"]
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
                     f"{pct(n['gap_pct'])} against fp32 AdamW ({fp}).")  # fmt: skip
    for o in n.get("other_lrs", []):
        what = f"lr {o['lr']:g}" if o.get("lr") is not None else f"{o['steps']} steps"
        if o["diverged"]:
            lines.append(f"At {what} it diverges as well (step {', '.join(map(str, o['diverged_at_steps']))}).")
        else:
            lines.append(f"At {what} it does not diverge (val-loss gap {pct(o['gap_pct'])} against fp32 at the same setting).")
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
    return lines


def _distributions(a: dict, by_key: dict, fp: str) -> list[str]:
    """Lines on the fp32 run's state distributions and the persistence of their outliers."""
    ans = a["answers"]
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
    return lines


def _error_growth(a: dict, by_key: dict, fp: str) -> list[str]:
    """Lines on growth exponents of the state errors, and their correlation with the loss gap."""
    ans = a["answers"]
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
    return lines


def _fixes(a: dict, by_key: dict, fp: str) -> list[str]:
    """Lines on each fix alone, on the zero-free base, and combined."""
    ans = a["answers"]
    f = ans["fixes"]
    lines = []
    for x in f["stage1"]:
        if x["diverged"]:
            lines.append(f"{x['label']}: still diverges (step {', '.join(map(str, x['diverged_at_steps']))}).")
        else:
            lines.append(f"{x['label']}: trains; val-loss gap {pct(x['gap_pct'])}.")
    if f.get("zero_free_base_gap_pct") is not None:
        lines.append(f"On the zero-free base (naive 4-bit with a zero-free linear v map: gap {pct(f['zero_free_base_gap_pct'])}), "
                     "adding one fix at a time:")  # fmt: skip
        for x in f["stage2"]:
            if x["diverged"]:
                lines.append(f"  - {x['label']}: diverges.")
            else:
                rec = x["recovered_pct_of_gap"]
                lines.append(f"  - {x['label']}: gap {pct(x['gap_pct'])}"
                             + (f", recovers {rec:.0f} % of the base's gap." if rec is not None else "."))  # fmt: skip
    for x in f["combined"]:
        lines.append(f"Combined — {x['label']}: " + ("diverges." if x["diverged"] else
                     f"gap {pct(x['gap_pct'])} at {x['state_bytes_per_param']:.3f} B/param of state."))  # fmt: skip
    return lines


def _correction(a: dict, by_key: dict, fp: str) -> list[str]:
    """Lines on error correction every K steps, in training and on the synthetic sequence."""
    ans = a["answers"]
    co = ans["correction"]["runs"]
    lines = []
    for x in co:
        if x["diverged"]:
            lines.append(f"{x['label']}: diverges (step {', '.join(map(str, x['diverged_at_steps']))}).")
        else:
            t = f", the residual tracks the true error within {100 * x['residual_tracking_err']:.0f} %" if x.get("residual_tracking_err") is not None else ""
            lines.append(f"{x['label']}: time-mean relative error of m {x['m_mean_rel_err']:.3f}" if x["m_mean_rel_err"] is not None else f"{x['label']}:")
            lines[-1] += f", gap {pct(x['gap_pct'])}, {x['state_bytes_per_param']:.3f} B/param{t}."
    syn = a.get("p5_synthetic")
    if syn:
        st = syn["setting"]
        for case, beta in (("m", 0.9), ("v", 0.999)):
            late = syn.get(case + "_late_mean", {})
            if late:
                lines.append(f"Synthetic sequence ({st['steps']} steps, {st['numel']} coordinates, {st['gradients']}; {st['codecs']}), "
                             f"{case} (beta {beta}): mean relative error over the second half "
                             + ", ".join(f"{k}: {v:.3f}" for k, v in late.items()) + ".")  # fmt: skip
    return lines


def _learned(a: dict, by_key: dict, fp: str) -> list[str]:
    """Lines on learned codebooks against the uniform and dynamic maps."""
    ans = a["answers"]
    le = ans["learned"]["runs"]
    lines = []
    for x in le:
        if x["diverged"]:
            lines.append(f"{x['label']}: diverges.")
        else:
            lines.append(f"{x['label']}: gap {pct(x['gap_pct'])}; mean relative error m {x['m_mean_rel_err'] or 0:.3f}, v "
                         f"{x['v_mean_rel_err'] or 0:.3f}; {x['state_bytes_per_param']:.3f} B/param.")  # fmt: skip
    return lines


def _layers(a: dict, by_key: dict, fp: str) -> list[str]:
    """Lines on errors by depth and kind, and the per-layer sensitivity runs."""
    ans = a["answers"]
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
            parts.append(f"{x['group']}: " + (f"diverges (step {', '.join(map(str, x['diverged_at_steps']))})" if x["diverged"] else pct(x["gap_pct"])))
        lines.append("Per-layer sensitivity (one group at 4 bits, the rest fp32; val-loss gap against the all-fp32 run of the "
                     "same optimizer), most sensitive first: " + "; ".join(parts) + ".")  # fmt: skip
        tol = [x for x in la["sensitivity"] if not x["diverged"] and x["gap_pct"] is not None and x["gap_pct"] < 0.5]
        if tol:
            lines.append("Groups that tolerate 4 bits (gap < 0.5 %): " + ", ".join(x["group"] for x in tol) + ".")
    return lines


def _control(a: dict, by_key: dict, fp: str) -> list[str]:
    """Lines on how far the learning rate alone moves fp32 AdamW (the scale of a gap)."""
    ctrl = [c for c in a["configs"] if c["stage"] == "control" and c["runs"]]
    return [f"{c['label']}: " + ("diverges." if c["diverged"] else f"val loss {c['final_val_loss']:.4f}, {pct(c['gap_pct'])} against "
                                 f"fp32 at the base learning rate ({fp}).") for c in ctrl]  # fmt: skip


def _sharpness(a: dict, by_key: dict, fp: str) -> list[str]:
    """Lines on the top Hessian eigenvalue the probes measured over training."""
    sh = a["answers"]["sharpness"]
    lines = []
    for key, v in sh.items():
        lines.append(f"{by_key[key]['label'] if key in by_key else key}: top Hessian eigenvalue "
                     + ", ".join(f"{e:.1f} (step {s})" for s, e in zip(v["steps"], v["eigenvalue"])) + ".")  # fmt: skip
    return lines


# question, the function that answers it, the line when it has nothing to say (None: leave the question out)
QUESTIONS = (
    ('Does naive 4-bit fail here, and how?', _naive_failure, None),
    ('Are the states Gaussian, and do outliers persist?', _distributions, 'Not measured (no fp32 run with probes).'),
    ('Does the error grow linearly or sub-linearly?', _error_growth, 'Not measured.'),
    ('Which fix recovers how much?', _fixes, 'Not measured.'),
    ('P5: does error correction every K steps help?', _correction, 'Not measured.'),
    ('P6: learned codebooks vs uniform and dynamic maps', _learned, 'Not measured.'),
    ('Which layers fail first: early vs late, attention vs MLP vs embeddings?', _layers, 'Not measured.'),
    ("Context: how far does the learning rate alone move fp32?", _control, None),
    ("Sharpness (top Hessian eigenvalue, power iteration on one fixed batch)", _sharpness, None),
)


def sentences(a: dict) -> dict[str, list[str]]:
    """Plain-sentence answers to the study's questions, with the numbers.

    Args:
        a: ``analysis.characterization.analyze``'s result (plus ``p5_synthetic`` when the synthetic experiment ran).

    Returns:
        question -> its lines, in the report's order.
    """
    by_key = {c["key"]: c for c in a["configs"]}
    fp32 = a.get("fp32_val_loss")
    fp = f"{fp32:.4f}" if fp32 is not None else "n/a"
    out = {}
    for question, answer, fallback in QUESTIONS:
        lines = answer(a, by_key, fp)
        if lines or fallback is not None:
            out[question] = lines or [fallback]
    return out
