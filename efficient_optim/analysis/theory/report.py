"""``report.md`` of ``effopt theory``: what was run, the findings in sentences, then the tables."""

from __future__ import annotations

from . import findings as F

CONVERGENCE_MODEL = (
    "Model: the run is its reference's iteration plus the measured update error e_t (the step taken minus the "
    "step the exact-state reference takes from the same point with the same gradient history). If the reference "
    "contracts the distance by q per step (its measured rate) down to its own floor F_ref, then the rate lies in "
    "the *aligned band* q +- rho*r (rho: relative update error, r: reference step / distance, both measured) and "
    "near sqrt(q^2 + (rho r)^2) when the errors are independent; the floor is at most F_ref + E/(1 - q) (aligned) "
    "and about sqrt(F_ref^2 + E^2/(1 - q^2)) (independent), E the rms update error over the last 10 % of steps. "
    "Distances are relative to the start's; a floor is *reached* when the last 10 % of steps fell by less than 12 %."
)


def _section(title: str, lines: list[str]) -> str:
    return f"## {title}\n\n" + "\n".join(lines) + "\n"


def report_markdown(data: dict, figures: dict[str, str]) -> str:
    """The whole report from ``theory.json``'s ``data``; ``figures`` maps a part to its figure's file name."""
    s = data["settings"]
    parts = [f"# Convergence and error-propagation checks\n\nCommand: `{data.get('command', 'effopt theory')}` "
             f"({data.get('seconds', 0):.0f} s). Parts: {', '.join(s['parts'])}.\n"]  # fmt: skip
    conv = data.get("convergence")
    if conv:
        probs = [f"- {p['name']}: {p['description']} (mu {p['mu']:.3g}, L {p['L']:.3g}, kappa {p['kappa']:.3g})" for p in conv["problems"]]
        parts.append(_section("Convergence on problems with known optima",
                              [f"{conv['steps']} steps at a constant learning rate, weight decay 0, from x0 = 0.", "", *probs, "",
                               CONVERGENCE_MODEL, "", *F.convergence_findings(conv), "", F.convergence_table(conv)]
                              + ([f"![convergence]({figures['convergence']})"] if "convergence" in figures else [])))  # fmt: skip
    ema = data.get("ema")
    if ema:
        intro = ("Synthetic gradients g = mean + noise (regimes: " + ", ".join(f"{k}: mean std {v['signal']:g}, noise std {v['noise']:g}"
                 for k, v in ema["regimes"].items()) + ") streamed through an EMA stored by each codec; the error of the stored "
                 "state against the exact EMA, in units of the recent one-step quantization error, over the last quarter of "
                 "the steps. Independent errors predict 1/sqrt(1 - beta^2) (2.29 at 0.9, 22.4 at 0.999), aligned ones "
                 "1/(1 - beta) (10, 1000); both predictions are recomputed from the measured one-step errors.")  # fmt: skip
        parts.append(_section("Quantization error accumulated in moment EMAs", [intro, "", *F.ema_findings(ema), ""]
                              + ([f"![ema]({figures['ema']})"] if "ema" in figures else [])))  # fmt: skip
    bits = data.get("bits")
    if bits:
        intro = (f"{bits['problem']}, {bits['steps']} iterations. *weights*: gradient descent (lr 1/L) whose iterate is "
                 "stored at b bits; *momentum*: heavy ball (beta 0.9) whose buffer is stored at b bits, weights fp32. "
                 "Blocks of 64 with absmax scales, a linear map of 2^b - 1 levels; error feedback keeps an fp32 residual. "
                 "Reachable eps: median relative distance to x* over the last 10 % of iterations. The bound is the "
                 "distance of x* from its own rounding (no b-bit iterate in this format is closer); it halves with each bit.")  # fmt: skip
        parts.append(_section("Bits vs reachable epsilon", [intro, "", *F.bits_findings(bits), "", _bits_table(bits)]
                              + ([f"![bits]({figures['bits']})"] if "bits" in figures else [])))  # fmt: skip
    return "\n".join(parts)


def _bits_table(bits: dict) -> str:
    cols = list(bits["lower_bound"])
    head = "| stored | method | " + " | ".join(f"{b} bits" for b in cols) + " |\n|---|---|" + "---:|" * len(cols) + "\n"
    rows = ["| (bound) | best representable | " + " | ".join(f"{bits['lower_bound'][b]:.2g}" for b in cols) + " |"]
    for r in bits["runs"]:
        if r["label"].startswith("fp32"):
            cells = [f"{r['eps'][b]:.2g}" if r["eps"][b] is not None else "diverged" for b in cols]
            rows.append(f"| {r['target']} | {r['label']} | " + " | ".join(cells) + " |")
            continue
        cells = ["diverged" if r["eps"][b] is None else f"{r['eps'][b]:.2g}" for b in cols]
        rows.append(f"| {r['target']} | {r['label']} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"
