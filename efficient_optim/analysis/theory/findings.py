"""Plain sentences and tables of ``effopt theory``'s report, from its ``theory.json`` data."""

from __future__ import annotations


def _g(x, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}"


def _rate(x) -> str:
    return "n/a" if x is None else f"{x:.0f}"


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
    else:
        kind = "near the independent-error value" if p["rate_near_independent"] else "far from the independent-error value (systematic errors)"
        parts.append(f"rate: holds, {kind}")
    if p.get("floor_below_aligned") is None:
        parts.append("floor: not comparable (a floor was not reached)")
    elif not p["floor_below_aligned"]:
        parts.append(f"floor: **breaks** ({_g(s['floor'])} above the aligned bound {_g(p['floor_aligned'])})")
    elif ref_floor is not None and s["floor"] < ref_floor / 2:
        parts.append(f"floor: **breaks** downward ({_g(s['floor'])}, below the reference's own {_g(ref_floor)}: "
                     "the error changed the rule's dynamics, not just added to it)")  # fmt: skip
    else:
        kind = "near the independent-error value" if p["floor_near_independent"] else "below the bound, not near the independent value"
        parts.append(f"floor: holds, {kind}")
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
        band = "" if not p or p["rate_independent"] is None else (
            f"{_rate(p['rate_aligned_fast'])}..{'no convergence' if p['rate_aligned_slow'] is None else _rate(p['rate_aligned_slow'])}; "
            f"{_rate(p['rate_independent'])}")  # fmt: skip
        floors = "" if not p else f"{_g(p['floor_independent'])}; {_g(p['floor_aligned'])}"
        rho = "" if r["reference"] is None else f"{_g(s.get('rho_linear'))}; {_g(s.get('rho_floor'))}"
        rows.append(f"| {r['problem']} | {r['optimizer']} | {r['lr']:g} | {_rate(s['steps_per_decade'])} | {band} | "
                    f"{_g(s['floor'])} | {'yes' if s['floor_reached'] else 'no'} | {floors} | {rho} |")  # fmt: skip
    return head + "\n".join(rows) + "\n"


def convergence_findings(data: dict) -> list[str]:
    """One sentence per compressed optimizer and problem, and a count of where the model holds."""
    lines, holds, breaks = [], 0, 0
    floors = {(r["problem"], r["optimizer"]): r["summary"].get("floor") for r in data["runs"]}
    for r in data["runs"]:
        if r["reference"] is None:
            continue
        s = r["summary"]
        ref_floor = floors.get((r["problem"], r["reference"]))
        verdict = model_verdict(r, ref_floor)
        breaks += verdict.count("**breaks**")
        holds += verdict.count("holds")
        lines.append(f"- **{r['optimizer']}** on {r['problem']} (reference {r['reference']}): "
                     f"{_rate(s.get('steps_per_decade'))} steps per decade of distance, floor {_g(s.get('floor'))} "
                     f"(reference: {_g(ref_floor)}), relative update error {_g(s.get('rho_linear'))} in the linear "
                     f"phase; {verdict}.")  # fmt: skip
    if holds + breaks:
        lines.insert(0, f"The additive-error model holds in {holds} of {holds + breaks} comparable rate and floor checks "
                        f"and breaks in {breaks}.")  # fmt: skip
    return lines


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
                     f"*{r['closer_to']}*; relative error of the state {r['final_relative_error']:.2g}.")  # fmt: skip
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
