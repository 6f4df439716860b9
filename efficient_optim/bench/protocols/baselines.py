"""Baselines comparison (protocol P1): every baseline people already use beside this library's own optimizers.

SGD with momentum, Adam, AdamW, bitsandbytes' 8-bit AdamW, Adafactor and Lion next to QAdamW 8/4-bit and
HybridAdam, 3 seeds. Targets of each of ours against AdamW (Adam when AdamW did not finish): optimizer state at
least 2x smaller, validation perplexity within 2 %, step time at most 1.2x, at least 3 seeds; steps to 1.05x
the reference's final perplexity for everyone; the final sharpness of every run. ``--lr-sweep`` adds each
optimizer at 0.3x and 3x the learning rate (1 seed).
"""

from __future__ import annotations

import dataclasses

from ..report import Group, group_runs, steps_to_target
from ..runner import plan_matrix
from .base import (
    MET,
    NOT_MEASURABLE,
    NOT_MET,
    Protocol,
    Verdict,
    available,
    check,
    find_group,
    pct,
    quality_check,
    relative,
    why_missing,
)


class Baselines(Protocol):
    """Every baseline beside this library's own, >= 3 seeds; targets against Adam(W)."""

    name = "baselines"
    aliases = ("p1",)
    protocol_id = "P1"
    title = "Baselines (P1)"
    baselines = ("sgd", "adam", "adamw", "adamw_bnb_8bit", "adafactor", "lion")
    ours = ("qadamw8", "qadamw4", "hybrid_adam")
    sharpness_iters = (10, 5)  # power iterations at the end of each run (full, --quick): ~1-2 % of a run's time

    def __init__(self):
        self.lr_sweep = False

    def add_options(self, ap) -> None:
        ap.add_argument("--lr-sweep", action="store_true",
                        help="also run each optimizer at 0.3x and 3x the learning rate (1 seed); the full sweep is "
                        "effopt suite lr-sweep")  # fmt: skip

    def configure(self, args) -> None:
        self.lr_sweep = bool(getattr(args, "lr_sweep", False))

    def plan(self, base, seeds, quick):
        missing = [Verdict("optimizer runs", n, "n/a", NOT_MEASURABLE, why_missing(n))
                   for n in self.baselines + self.ours if not available(n)]  # fmt: skip
        specs = [n for n in self.baselines + self.ours if available(n)]
        main = base if base.sharpness_iters else dataclasses.replace(base, sharpness_iters=self.sharpness_iters[bool(quick)])
        plan = plan_matrix(main, specs, seeds)
        if self.lr_sweep:
            sweep = {f"lr={base.lr * f:g}": {"lr": base.lr * f} for f in (0.3, 3.0)}
            plan += plan_matrix(base, specs, 1, sweep)
        return plan, missing

    @staticmethod
    def reference(groups: list[Group]) -> Group | None:
        """The group every target is measured against: AdamW, or Adam when AdamW did not finish."""
        return find_group(groups, "adamw") or find_group(groups, "adam")

    def table_target(self, runs):
        ref = self.reference(group_runs(runs))
        return None if ref is None else 1.05 * ref.stat("val_ppl")[0]

    def verdicts(self, runs, out, base):
        groups = group_runs(runs)
        ref = self.reference(groups)
        if ref is None:
            return [Verdict("all targets", "-", "n/a", NOT_MEASURABLE, "AdamW/Adam did not finish")]
        out_v = []
        for g in groups:
            if g.optimizer in self.ours:
                out_v += self._targets(g, ref)
        target = self.table_target(runs)
        for g in groups:
            steps = steps_to_target(out, g, target)
            out_v.append(Verdict(f"steps to val ppl {target:.3f} (1.05x {ref.optimizer}'s final)", g.label,
                                 "never" if steps is None else f"{steps:.0f}", "measured"))  # fmt: skip
        out_v += self._sharpness(groups)
        out_v.append(Verdict("quantization error over time", "-", "n/a", NOT_MEASURABLE,
                             "this suite attaches no state probes: `effopt characterize` measures it against an fp32 "
                             "shadow (docs/characterization.md)"))  # fmt: skip
        out_v.append(Verdict("learning-rate sensitivity", "-", "n/a", NOT_MEASURABLE,
                             "run `effopt suite lr-sweep` (a log-spaced lr grid per optimizer; docs/lr_sweep.md) or "
                             "`effopt suite baselines --lr-sweep` (0.3x and 3x the lr, 1 seed)")
                     if not any(g.settings.startswith("lr=") for g in groups) else _lr_sensitivity(groups))  # fmt: skip
        return out_v

    @staticmethod
    def _targets(g: Group, ref: Group) -> list[Verdict]:
        """Memory, quality, speed and seed-count targets of one of our optimizers against ``ref``."""
        name, subject = ref.optimizer, g.label
        if not g.ok:
            return [Verdict("no divergence", subject, f"{len(g.rows)}/{len(g.rows)} diverged", NOT_MET)]
        mem = ref.stat("state_bytes")[0] / g.stat("state_bytes")[0]
        v = [check(f"optimizer memory >= 2x below {name}", subject, mem, lambda x: x >= 2, f"{mem:.2f}x smaller")]
        ppl = relative(g, ref, "val_ppl")
        v.append(quality_check(f"< 2% perplexity degradation vs {name}", g, ref, ppl, lambda x: x < 0.02, f"{pct(ppl)} val ppl"))
        t = relative(g, ref, "step_time_ms")
        timing = check(f"wall-clock <= 1.2x {name}", subject, t, lambda x: x <= 0.2,
                       f"{1 + t:.2f}x step time" if t is not None else "n/a")  # fmt: skip
        if t is not None and (g.timing_loaded or ref.timing_loaded):
            timing = dataclasses.replace(timing, verdict=NOT_MEASURABLE, reason="timing not comparable: the machine's "
                                         "load exceeded its cores during these runs (see the report's notes)")  # fmt: skip
        v.append(timing)
        n = len(g.ok)
        v.append(Verdict(">= 3 seeds", subject, f"{n} seeds", MET if n >= 3 else NOT_MET))
        return v

    @staticmethod
    def _sharpness(groups: list[Group]) -> list[Verdict]:
        """The top Hessian eigenvalue each run measured at its end (mean over seeds)."""
        crit = "sharpness (top positive Hessian eigenvalue of the training loss at the end, one fixed batch)"
        measured = [g for g in groups if g.stat("sharpness")[0] is not None]
        if not measured:
            return [Verdict(crit, "-", "n/a", NOT_MEASURABLE, "these runs did not measure it (run config "
                            "sharpness_iters = 0); `effopt suite baselines` measures it at the end of each run")]  # fmt: skip
        out = []
        for g in measured:
            mean, _ = g.stat("sharpness")
            sd = g.spread("sharpness")
            text = f"{mean:.3g}" + (f" ± {sd:.2g}" if sd is not None else " (1 seed)")
            unconverged = sum(1 for r in g.ok if r.get("sharpness_converged") is False)
            out.append(Verdict(crit, g.label, text, "measured",
                               f"{unconverged} seed(s) not converged in the power iterations" if unconverged else ""))  # fmt: skip
        return out


def _lr_sensitivity(groups: list[Group]) -> Verdict:
    spread = {}
    for g in groups:
        if g.settings.startswith("lr=") and g.ok:
            spread.setdefault(g.optimizer, []).append(g.stat("final_val_loss")[0])
    text = ", ".join(f"{k}: {max(v) - min(v):.3f}" for k, v in spread.items() if len(v) > 1)
    return Verdict("learning-rate sensitivity (val-loss range over the lr sweep)", "-", text or "n/a", "measured")


PROTOCOL = Baselines()
