"""Low-rank Adam study (protocol P7): AdamW against LowRankAdam at ranks 8/16/32, refresh intervals, update strategies.

Its success and falsification criteria (docs/protocols.md): state >= 40 % smaller at rank 16, final val loss
within 2 % of Adam's, step time <= +15 %, gradient-norm variance <= 2x, seed spread < 1 %; falsified by > 5 %
degradation, < 20 % peak-memory saving, > 25 % slower steps, a rank collapse in the first 10 % of training,
late divergence, a reconstruction error above 50 % after step 1000, or parity only at r > 0.3 min(d).
"""

from __future__ import annotations

from pathlib import Path

from ..config import RunConfig, parse_spec
from ..metrics import MetricsLog
from ..report import Group, group_runs
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
    relative,
    why_missing,
)


class LowRankAdamStudy(Protocol):
    """P7: Adam vs low-rank Adam (ranks, refresh intervals, update strategies)."""

    name = "lowrank-adam"
    aliases = ("p7",)
    protocol_id = "P7"
    title = "Low-rank Adam minimum viable test (P7)"
    defaults = RunConfig(steps=1000, context=64, batch_size=16, lr=3e-3, eval_every=100)
    quick_steps = 60
    ranks = (8, 16, 32)
    refresh = (1, 10, 50, 100)
    strategies = ("randomized", "periodic", "online", "factor_ema")

    def specs(self, quick: bool) -> tuple[list[str], list[str]]:
        """(specs run over every seed, specs of the one-seed sweeps)."""
        main = ["adamw"] + [f"lowrank_adam+rank={r}" for r in self.ranks]
        sweep = [f"lowrank_adam+rank=16+svd_freq={k}" for k in (self.refresh[1:2] if quick else self.refresh)]
        sweep += [f"lowrank_adam+rank=16+update_strategy={s}" for s in (self.strategies[1:3] if quick else self.strategies)]
        return main, sweep

    def plan(self, base, seeds, quick):
        if not available("lowrank_adam"):
            return plan_matrix(base, ["adamw"], seeds), [Verdict("all criteria", "lowrank_adam", "n/a", NOT_MEASURABLE, why_missing("lowrank_adam"))]
        main, sweep = self.specs(quick)
        return plan_matrix(base, main, seeds) + plan_matrix(base, sweep, 1), []

    def verdicts(self, runs, out, base):
        groups = group_runs(runs)
        adam = find_group(groups, "adamw")
        r16 = find_group(groups, "lowrank_adam+rank=16")
        v = []
        if adam is None or r16 is None:
            return [Verdict("all criteria", "lowrank_adam+rank=16", "n/a", NOT_MEASURABLE, "AdamW or rank 16 has no finished run")]
        s = r16.label
        red = 1 - r16.stat("state_bytes")[0] / adam.stat("state_bytes")[0]
        v.append(check("success: optimizer-state reduction >= 40% at r=16", s, red, lambda x: x >= 0.4, f"{red * 100:.1f}% smaller"))
        gap = relative(r16, adam, "final_val_loss")
        v.append(check("success: final val loss within 2% of Adam", s, gap, lambda x: x <= 0.02, pct(gap)))
        t = relative(r16, adam, "step_time_ms")
        v.append(check("success: step time <= +15%", s, t, lambda x: x <= 0.15, pct(t)))
        var_ratio = (r16.stat("grad_norm_std")[0] / adam.stat("grad_norm_std")[0]) ** 2 if adam.stat("grad_norm_std")[0] else None
        v.append(check("success: grad-norm variance <= 2x Adam's", s, var_ratio, lambda x: x <= 2, f"{var_ratio:.2f}x" if var_ratio else "n/a"))
        mean, sd = r16.stat("final_val_loss")
        cv = sd / mean if len(r16.ok) >= 3 else None
        v.append(check("success: std across 3 seeds < 1% of mean", s, cv, lambda x: x < 0.01, f"{cv * 100:.2f}%" if cv is not None else "n/a",
                        f"{len(r16.ok)} seed(s) finished; needs 3"))  # fmt: skip
        v.append(check("falsified if > 5% loss degradation", s, gap, lambda x: x <= 0.05, pct(gap)))
        mem = 1 - r16.stat("peak_memory_bytes")[0] / adam.stat("peak_memory_bytes")[0]
        v.append(check("falsified if < 20% peak-memory reduction (SVD buffers counted)", s, mem, lambda x: x >= 0.2,
                        f"{mem * 100:.1f}% smaller ({r16.rows[0]['peak_memory_kind']})"))  # fmt: skip
        v.append(check("falsified if > 25% slower steps", s, t, lambda x: x <= 0.25, pct(t)))
        for g in groups:
            if not g.optimizer.startswith("lowrank_adam"):
                continue
            v.append(self._collapse(out, g, base))
            v.append(self._late_divergence(g, base))
            v.append(self._reconstruction(out, g, base))
        v.append(self._parity_rank(groups, adam, base))
        return v

    @staticmethod
    def _series(out: Path, g: Group, key: str) -> list[list[tuple[int, float]]]:
        res = []
        for r in g.rows:
            recs = MetricsLog(out / r["run_id"] / "metrics.jsonl").read()
            res.append([(rec["step"], rec[key]) for rec in recs if rec.get("kind") == "train" and rec.get(key) is not None])
        return res

    def _collapse(self, out, g, base) -> Verdict:
        crit = "falsified if rank collapses to 1 within the first 10% of training"
        series = self._series(out, g, "effective_rank_min")
        early = [val for s in series for step, val in s if step <= 0.1 * base.steps]
        if not early:
            return Verdict(crit, g.label, "n/a", NOT_MEASURABLE, "no effective-rank record in the first 10% of steps")
        return Verdict(crit, g.label, f"min effective rank {min(early):.1f}", MET if min(early) > 1 else NOT_MET)

    @staticmethod
    def _late_divergence(g, base) -> Verdict:
        crit = "falsified if loss > 2x initial after step 500"
        if base.steps < 500:
            return Verdict(crit, g.label, "n/a", NOT_MEASURABLE, f"runs have {base.steps} steps (< 500)")
        late = [r for r in g.rows if r["diverged"] and (r["diverged_at_step"] or 0) > 500]
        return Verdict(crit, g.label, f"{len(late)}/{len(g.rows)} diverged after 500", MET if not late else NOT_MET)

    def _reconstruction(self, out, g, base) -> Verdict:
        crit = "falsified if ||G - UV||/||G|| > 50% after step 1000"
        if base.steps < 1000:
            return Verdict(crit, g.label, "n/a", NOT_MEASURABLE, f"runs have {base.steps} steps (< 1000)")
        series = self._series(out, g, "reconstruction_error_mean")
        late = [val for s in series for step, val in s if step >= 1000]
        if not late:
            return Verdict(crit, g.label, "n/a", NOT_MEASURABLE, "the optimizer logged no reconstruction error")
        return Verdict(crit, g.label, f"{max(late) * 100:.1f}% (worst seed, at step >= 1000)", MET if max(late) <= 0.5 else NOT_MET)

    def _parity_rank(self, groups, adam, base) -> Verdict:
        crit = "falsified if parity (val loss within 2%) needs r > 0.3 min(d_in, d_out)"
        from ..models import lm_preset

        width = lm_preset(base.model, layers=base.layers, width=base.width, heads=base.heads).width
        limit = 0.3 * width
        parity = []
        for g in groups:
            name, kw = parse_spec(g.optimizer)
            if name == "lowrank_adam" and set(kw) == {"rank"} and g.ok:
                gap = relative(g, adam, "final_val_loss")
                if gap is not None and gap <= 0.02:
                    parity.append(kw["rank"])
        if not parity:
            return Verdict(crit, "lowrank_adam", "no tested rank reached parity", NOT_MET, f"ranks {self.ranks}, 0.3 min(d) = {limit:.0f}")
        return Verdict(crit, "lowrank_adam", f"smallest rank at parity {min(parity)} (0.3 min(d) = {limit:.0f})",
                       MET if min(parity) <= limit else NOT_MET)  # fmt: skip


PROTOCOL = LowRankAdamStudy()
