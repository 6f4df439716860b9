"""Plain sentences and tables of ``effopt theory``'s report, from its ``theory.json`` data."""

from __future__ import annotations


def _g(x, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}"


def _rate(x) -> str:
    return "n/a" if x is None else f"{x:.0f}"


def _rate_or_none(x) -> str:
    return "no convergence" if x is None else f"{x:.0f}"


def model_verdict(run: dict, ref_floor: float | None) -> str:
    """Where the additive-error model holds for one run, in words (rate, then floor)."""
    s, p = run["summary"], run["prediction"] or {}
    if s.get("diverged_at") is not None:
        return f"diverged at step {s['diverged_at']}: outside the model (no contraction)"
    parts = []
    if p.get("rate_in_band") is None:
        parts.append("rate: not comparable (no linear phase in this run or its reference)")
    elif not p["rate_in_band"]:
        parts.append(f"rate: **breaks** ({_rate(s['steps_per_decade'])} steps/decade, outside the aligned band "
                     f"{_rate(p['rate_aligned_fast'])}..{_rate(p['rate_aligned_slow'])})")  # fmt: skip
    elif p["rate_near_independent"]:
        parts.append(f"rate: holds, within 25 % of the independent-error prediction ({_rate(p['rate_independent'])})")
    else:
        ind = p["rate_independent"]
        off = "" if ind is None else f", {s['steps_per_decade'] / ind:.2g}x the independent-error prediction {ind:.0f}"
        parts.append(f"rate: inside the worst-case band only{off} (the errors are systematic, not random)")
    if p.get("floor_below_aligned") is None:
        parts.append("floor: not comparable (a floor was not reached)")
    elif not p["floor_below_aligned"]:
        parts.append(f"floor: **breaks** ({_g(s['floor'])} above the aligned bound {_g(p['floor_aligned'])})")
    elif ref_floor is not None and s["floor"] < ref_floor / 2:
        parts.append(f"floor: **breaks** downward ({_g(s['floor'])}, below the reference's own {_g(ref_floor)}: "
                     "the error changed the rule's dynamics, not just added to it)")  # fmt: skip
    elif p["floor_near_independent"]:
        parts.append(f"floor: holds, near the independent-error prediction {_g(p['floor_independent'])}")
    else:
        parts.append(f"floor: below the aligned bound {_g(p['floor_aligned'])}, not near the independent prediction "
                     f"{_g(p['floor_independent'])}")  # fmt: skip
    return "; ".join(parts)


def convergence_table(data: dict) -> str:
    """Per problem and optimizer: rate, floor, update error and the predictions."""
    head = ("| problem | optimizer | lr | steps/decade | predicted (aligned band; independent) | floor | reached | "
            "predicted floor (independent; aligned) | rho (linear; floor) |\n|---|---|---:|---:|---|---:|---|---|---|\n")  # fmt: skip
    rows = []
    for r in data["runs"]:
        s, p = r["summary"], r["prediction"] or {}
        if s.get("diverged_at") is not None:
            rows.append(f"| {r['problem']} | {r['optimizer']} | {r['lr']:g} | diverged at {s['diverged_at']} | | | | | |")
            continue
        band = "" if not p or p["rate_aligned_fast"] is None else (
            f"{_rate(p['rate_aligned_fast'])}..{_rate_or_none(p['rate_aligned_slow'])}; {_rate_or_none(p['rate_independent'])}")
        floors = "" if not p else f"{_g(p['floor_independent'])}; {_g(p['floor_aligned'])}"
        rho = "" if r["reference"] is None else f"{_g(s.get('rho_linear'))}; {_g(s.get('rho_floor'))}"
        rows.append(f"| {r['problem']} | {r['optimizer']} | {r['lr']:g} | {_rate(s['steps_per_decade'])} | {band} | "
                    f"{_g(s['floor'])} | {'yes' if s['floor_reached'] else 'no'} | {floors} | {rho} |")  # fmt: skip
    return head + "\n".join(rows) + "\n"


def _counts(data: dict) -> str:
    """How often each prediction held over the comparable runs, in one sentence."""
    runs = [r for r in data["runs"] if r["reference"] is not None and r["prediction"]]
    band = [r["prediction"]["rate_in_band"] for r in runs if r["prediction"]["rate_in_band"] is not None]
    ind = [r["prediction"]["rate_near_independent"] for r in runs if r["prediction"]["rate_near_independent"] is not None]
    floors = [r for r in runs if r["prediction"]["floor_below_aligned"] is not None]
    below_ref = [r for r in floors if r["summary"]["floor"] < _ref_floor(data, r) / 2]
    above = [r for r in floors if not r["prediction"]["floor_below_aligned"]]
    near = [r for r in floors if r["prediction"]["floor_near_independent"]]
    return (f"Rates: {sum(band)} of {len(band)} comparable runs inside the worst-case (aligned) band, {sum(ind)} of "
            f"{len(ind)} within 25 % of the independent-error prediction. Floors (both reached in {len(floors)} runs): "
            f"{len(near)} near the independent-error prediction, {len(above)} above the aligned bound, {len(below_ref)} "
            "more than 2x *below* the reference's own floor (the model cannot produce that).")  # fmt: skip


def _ref_floor(data: dict, run: dict) -> float:
    return next(r["summary"]["floor"] for r in data["runs"] if r["problem"] == run["problem"] and r["optimizer"] == run["reference"])


def convergence_findings(data: dict) -> list[str]:
    """A count of where the model's predictions hold, then one sentence per compressed optimizer and problem."""
    lines = []
    floors = {(r["problem"], r["optimizer"]): r["summary"].get("floor") for r in data["runs"]}
    for r in data["runs"]:
        if r["reference"] is None:
            continue
        s = r["summary"]
        ref_floor = floors.get((r["problem"], r["reference"]))
        lines.append(f"- **{r['optimizer']}** on {r['problem']} (reference {r['reference']}): "
                     f"{_rate(s.get('steps_per_decade'))} steps per decade of distance, floor {_g(s.get('floor'))} "
                     f"({'reached' if s.get('floor_reached') else 'not reached'}; reference: {_g(ref_floor)}), relative "
                     f"update error {_g(s.get('rho_linear'))} in the linear phase; {model_verdict(r, ref_floor)}.")  # fmt: skip
    return ([_counts(data), ""] if lines else []) + lines


def ema_findings(data: dict) -> list[str]:
    """Per moment, regime and codec: the steady accumulation factor against the two predictions."""
    lines = []
    for r in data["runs"]:
        st = r["steady"]
        if st["ratio"] is None:
            continue
        lines.append(f"- {r['moment']} (beta {r['beta']:g}), {r['regime']} gradients, **{r['codec']}**: the stored "
                     f"state is {st['ratio']:.2f}x the recent one-step error away from the exact EMA (independent "
                     f"errors predict {st['independent']:.2f}x, aligned {st['aligned']:.1f}x): closer to "
                     f"*{r['closer_to']}*; relative error of the state {r['final_relative_error']:.2g}"
                     + (f"; {100 * st['frozen_frac']:.0f} % of its elements did not change in the last step" if st["frozen_frac"] >= 0.1 else "")
                     + ".")  # fmt: skip
    return lines


def bits_findings(data: dict, targets_eps=(1e-2, 1e-3)) -> list[str]:
    """Per stored quantity and method: the bits needed for each target epsilon, against the bound's."""
    from .bits import bits_needed

    def need(eps_by_bits: dict) -> list[str]:
        out = []
        for t in targets_eps:
            b = bits_needed({int(k): v for k, v in eps_by_bits.items()}, t)
            out.append(f"eps {t:g}: {'more than ' + str(max(int(k) for k in eps_by_bits)) if b is None else b} bits")
        return out

    lines = [f"- bound (the closest point the format can hold): {', '.join(need(data['lower_bound']))}; "
             f"at 8 bits {data['lower_bound']['8']:.2g}."]  # fmt: skip
    for r in data["runs"]:
        if r["label"].startswith("fp32"):
            e = next(iter(r["eps"].values()))
            lines.append(f"- {r['target']}, **{r['label']}**: {_g(e)}, the floor of the same iteration without quantization "
                         "(fp32 weights stall where a step is below half their rounding step).")  # fmt: skip
            continue
        e8 = r["eps"].get("8")
        ratio = "" if e8 is None else f"; at 8 bits {e8:.2g} ({e8 / data['lower_bound']['8']:.2g}x the bound)"
        lines.append(f"- {r['target']}, **{r['label']}**: {', '.join(need(r['eps']))}{ratio}.")
    return lines
