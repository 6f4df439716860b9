"""Research protocols (docs/protocols.md) as suites: one command runs the matrix, the report gives
every criterion with its measured value and a verdict (met / not met / not measurable here, and why).
A ``--quick`` run (fewer steps, one seed) gives *indicative* verdicts only: it says which way a criterion
points, never that it is met or failed.

    effopt suite --list
    effopt suite p1                 # baselines: SGD, Adam, AdamW, bnb 8-bit, Adafactor, Lion + ours, 3 seeds
    effopt suite p7 --quick         # low-rank Adam minimum viable test, a short version
    effopt report runs/suite/p1/...  # rebuild the report and verdicts from the files

A suite is a plan (``plan(base, quick)``: the runs) plus ``verdicts(runs, out, base)``. Later protocols
register theirs with ``register_suite``. Missing optimizers (not installed, or not built yet) are
reported as criteria that could not be measured, never dropped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from ..registry import list_optimizers, optimizer_entry
from .config import RunConfig, parse_spec
from .metrics import MetricsLog, write_json_atomic
from .options import HelpFormatter, add_run_options, base_config, log_names, output_folder
from .preflight import preflight
from .report import Group, build_report, group_runs, seed_spread, steps_to_target, terminal_table
from .runner import plan_matrix, run_matrix

MET, NOT_MET, NOT_MEASURABLE = "met", "not met", "not measurable here"
INDICATIVE = "indicative"


@dataclass
class Verdict:
    """One criterion of a protocol, for one subject (an optimizer or a setting)."""

    criterion: str
    subject: str
    measured: str
    verdict: str
    reason: str = ""


def available(name: str) -> bool:
    return name in list_optimizers() and optimizer_entry(name).available()


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:+.2f}%"


def _find(groups: list[Group], spec: str, settings: str | None = None) -> Group | None:
    for g in groups:
        if g.optimizer == spec and (settings is None or g.settings == settings) and g.ok:
            return g
    return None


def _rel(g: Group, base: Group, key: str) -> float | None:
    a, b = g.stat(key)[0], base.stat(key)[0]
    return None if a is None or not b else a / b - 1


def _check(criterion: str, subject: str, value: float | None, ok, measured: str, missing: str = "") -> Verdict:
    if value is None:
        return Verdict(criterion, subject, "n/a", NOT_MEASURABLE, missing or "no finished run to measure")
    return Verdict(criterion, subject, measured, MET if ok(value) else NOT_MET)


class Suite:
    """Base of a protocol suite: ``name``, ``title``, ``plan`` and ``verdicts``."""

    name = ""
    title = ""
    defaults = RunConfig(steps=300, context=64, batch_size=16, lr=3e-3, eval_every=50)
    quick_steps = 60
    seeds = 3

    def plan(self, base: RunConfig, seeds: int, quick: bool) -> tuple[list[RunConfig], list[Verdict]]:
        """The runs, and verdicts for what cannot run here (missing optimizers)."""
        raise NotImplementedError

    def verdicts(self, runs: list[dict], out: Path, base: RunConfig) -> list[Verdict]:
        raise NotImplementedError

    def add_options(self, ap: argparse.ArgumentParser) -> None:
        """The suite's own command-line options (none by default)."""

    def configure(self, args: argparse.Namespace) -> None:
        """Read the suite's own options before ``plan`` (``UsageError`` for bad values)."""

    def sections(self, runs: list[dict], out: Path, base: RunConfig) -> list[str]:
        """Extra markdown sections of ``report.md``, after the verdicts (none by default)."""
        return []

    def table_target(self, runs: list[dict]) -> float | None:
        """The perplexity the report table's steps-to-target column measures (default: the runs' own)."""
        return None


def indicative(verdicts: list[Verdict], base: RunConfig, seeds: int) -> list[Verdict]:
    """A quick run's verdicts: met / not met become ``indicative``, the direction kept in the reason."""
    out = []
    for v in verdicts:
        if v.verdict in (MET, NOT_MET):
            why = f"quick run ({base.steps} steps, {seeds} seed(s)): points to '{v.verdict}'"
            v = dataclasses.replace(v, verdict=INDICATIVE, reason=f"{why}; {v.reason}" if v.reason else why)
        out.append(v)
    return out


def _quality_check(criterion: str, g: Group, ref: Group, value: float | None, ok, measured: str) -> Verdict:
    """``_check`` for a quality gap: indicative with one seed on either side, the seed spread in the reason."""
    v = _check(criterion, g.label, value, ok, measured)
    if value is None:
        return v
    spread = seed_spread(g, ref)
    if spread == "unknown":
        return dataclasses.replace(v, verdict=INDICATIVE, reason=f"one seed: points to '{v.verdict}'; the seed spread is unknown")
    return dataclasses.replace(v, reason=f"gap {spread} the seed spread ({len(g.ok)} vs {len(ref.ok)} seeds)")


# ------------------------------------------------------------------------------------------------ P1
class P1Baselines(Suite):
    """P1: every baseline beside this library's own, ≥ 3 seeds; targets against Adam(W)."""

    name = "p1"
    title = "P1. Baselines"
    baselines = ("sgd", "adam", "adamw", "adamw_bnb_8bit", "adafactor", "lion")
    ours = ("qadamw8", "qadamw4", "hybrid_adam")
    sharpness_iters = (10, 5)  # power iterations at the end of each run (full, --quick): ~1-2 % of a run's time

    def plan(self, base, seeds, quick):
        missing = [Verdict("optimizer runs", n, "n/a", NOT_MEASURABLE, _why_missing(n))
                   for n in self.baselines + self.ours if not available(n)]  # fmt: skip
        specs = [n for n in self.baselines + self.ours if available(n)]
        if not base.sharpness_iters:
            base = dataclasses.replace(base, sharpness_iters=self.sharpness_iters[bool(quick)])
        return plan_matrix(base, specs, seeds), missing

    @staticmethod
    def reference(groups: list[Group]) -> Group | None:
        """The group every target is measured against: AdamW, or Adam when AdamW did not finish."""
        return _find(groups, "adamw") or _find(groups, "adam")

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
                             "`effopt suite p1 --lr-sweep` (0.3x and 3x the lr, 1 seed)")
                     if not any(g.settings.startswith("lr=") for g in groups) else _lr_sensitivity(groups))  # fmt: skip
        return out_v

    @staticmethod
    def _targets(g: Group, ref: Group) -> list[Verdict]:
        """Memory, quality, speed and seed-count targets of one of our optimizers against ``ref``."""
        name, subject = ref.optimizer, g.label
        if not g.ok:
            return [Verdict("no divergence", subject, f"{len(g.rows)}/{len(g.rows)} diverged", NOT_MET)]
        mem = ref.stat("state_bytes")[0] / g.stat("state_bytes")[0]
        v = [_check(f"optimizer memory >= 2x below {name}", subject, mem, lambda x: x >= 2, f"{mem:.2f}x smaller")]
        ppl = _rel(g, ref, "val_ppl")
        v.append(_quality_check(f"< 2% perplexity degradation vs {name}", g, ref, ppl, lambda x: x < 0.02, f"{_pct(ppl)} val ppl"))
        t = _rel(g, ref, "step_time_ms")
        timing = _check(f"wall-clock <= 1.2x {name}", subject, t, lambda x: x <= 0.2,
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
                            "sharpness_iters = 0); `effopt suite p1` measures it at the end of each run")]  # fmt: skip
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


def _why_missing(name: str) -> str:
    if name not in list_optimizers():
        return f"{name} is not in this version of the library"
    return f"{name} needs `pip install {optimizer_entry(name).requires}`"


# ------------------------------------------------------------------------------------------------ P7
class P7LowRank(Suite):
    """P7: Adam vs low-rank Adam (ranks, refresh intervals, update strategies)."""

    name = "p7"
    title = "P7. Low-rank Adam minimum viable test"
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
            return plan_matrix(base, ["adamw"], seeds), [Verdict("all criteria", "lowrank_adam", "n/a", NOT_MEASURABLE, _why_missing("lowrank_adam"))]
        main, sweep = self.specs(quick)
        return plan_matrix(base, main, seeds) + plan_matrix(base, sweep, 1), []

    def verdicts(self, runs, out, base):
        groups = group_runs(runs)
        adam = _find(groups, "adamw")
        r16 = _find(groups, "lowrank_adam+rank=16")
        v = []
        if adam is None or r16 is None:
            return [Verdict("all criteria", "lowrank_adam+rank=16", "n/a", NOT_MEASURABLE, "AdamW or rank 16 has no finished run")]
        s = r16.label
        red = 1 - r16.stat("state_bytes")[0] / adam.stat("state_bytes")[0]
        v.append(_check("success: optimizer-state reduction >= 40% at r=16", s, red, lambda x: x >= 0.4, f"{red * 100:.1f}% smaller"))
        gap = _rel(r16, adam, "final_val_loss")
        v.append(_check("success: final val loss within 2% of Adam", s, gap, lambda x: x <= 0.02, _pct(gap)))
        t = _rel(r16, adam, "step_time_ms")
        v.append(_check("success: step time <= +15%", s, t, lambda x: x <= 0.15, _pct(t)))
        var_ratio = (r16.stat("grad_norm_std")[0] / adam.stat("grad_norm_std")[0]) ** 2 if adam.stat("grad_norm_std")[0] else None
        v.append(_check("success: grad-norm variance <= 2x Adam's", s, var_ratio, lambda x: x <= 2, f"{var_ratio:.2f}x" if var_ratio else "n/a"))
        mean, sd = r16.stat("final_val_loss")
        cv = sd / mean if len(r16.ok) >= 3 else None
        v.append(_check("success: std across 3 seeds < 1% of mean", s, cv, lambda x: x < 0.01, f"{cv * 100:.2f}%" if cv is not None else "n/a",
                        f"{len(r16.ok)} seed(s) finished; needs 3"))  # fmt: skip
        v.append(_check("falsified if > 5% loss degradation", s, gap, lambda x: x <= 0.05, _pct(gap)))
        mem = 1 - r16.stat("peak_memory_bytes")[0] / adam.stat("peak_memory_bytes")[0]
        v.append(_check("falsified if < 20% peak-memory reduction (SVD buffers counted)", s, mem, lambda x: x >= 0.2,
                        f"{mem * 100:.1f}% smaller ({r16.rows[0]['peak_memory_kind']})"))  # fmt: skip
        v.append(_check("falsified if > 25% slower steps", s, t, lambda x: x <= 0.25, _pct(t)))
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
        from .models import lm_preset

        width = lm_preset(base.model, layers=base.layers, width=base.width, heads=base.heads).width
        limit = 0.3 * width
        parity = []
        for g in groups:
            name, kw = parse_spec(g.optimizer)
            if name == "lowrank_adam" and set(kw) == {"rank"} and g.ok:
                gap = _rel(g, adam, "final_val_loss")
                if gap is not None and gap <= 0.02:
                    parity.append(kw["rank"])
        if not parity:
            return Verdict(crit, "lowrank_adam", "no tested rank reached parity", NOT_MET, f"ranks {self.ranks}, 0.3 min(d) = {limit:.0f}")
        return Verdict(crit, "lowrank_adam", f"smallest rank at parity {min(parity)} (0.3 min(d) = {limit:.0f})",
                       MET if min(parity) <= limit else NOT_MET)  # fmt: skip


SUITES: dict[str, Suite] = {}


def register_suite(suite: Suite) -> None:
    """Add a protocol suite (later issues register P2-P9 here)."""
    SUITES[suite.name] = suite


register_suite(P1Baselines())
register_suite(P7LowRank())


def verdict_markdown(title: str, verdicts: list[Verdict]) -> str:
    lines = [f"## Verdicts: {title}", "", "| criterion | subject | measured | verdict | why |", "|---|---|---|---|---|"]
    lines += [f"| {v.criterion} | {v.subject} | {v.measured} | **{v.verdict}** | {v.reason} |" for v in verdicts]
    return "\n".join(lines) + "\n"


def _write_suite(out: Path, suite: Suite, base: RunConfig, missing: list[Verdict], quick: bool = False,
                 seeds: int | None = None) -> Path:  # fmt: skip
    """Compute the verdicts (indicative ones for a ``quick`` run of ``seeds`` seeds), write suite.json and report.md."""
    from .runner import collect_summary, load_plan

    runs = collect_summary(out, load_plan(out))["runs"]
    verdicts = missing + suite.verdicts(runs, out, base)
    if quick:
        verdicts = indicative(verdicts, base, seeds or 1)
    write_json_atomic(out / "suite.json", {"suite": suite.name, "title": suite.title, "base": base.to_dict(),
                                           "quick": quick, "seeds": seeds,
                                           "missing": [dataclasses.asdict(v) for v in missing],
                                           "verdicts": [dataclasses.asdict(v) for v in verdicts]})  # fmt: skip
    return build_report(out, suite.title, [verdict_markdown(suite.title, verdicts), *suite.sections(runs, out, base)],
                        target_ppl=suite.table_target(runs))  # fmt: skip


def rebuild_suite_report(out: Path) -> Path:
    """Recompute a suite's verdicts and report from its folder (``effopt report``)."""
    meta = json.loads((out / "suite.json").read_text())
    suite = SUITES[meta["suite"]]
    missing = [Verdict(**v) for v in meta.get("missing", [])]
    return _write_suite(out, suite, RunConfig.from_dict(meta["base"]), missing, meta.get("quick", False), meta.get("seeds"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="effopt suite", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("name", nargs="?", help="protocol: " + ", ".join(SUITES))
    ap.add_argument("--list", action="store_true", help="list the suites")
    ap.add_argument("--quick", action="store_true", help="a short version (fewer steps, one seed, smaller sweeps)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds for the main comparison (default 3; --quick: 1)")
    ap.add_argument("--lr-sweep", action="store_true", help="P1: also run each optimizer at 0.3x and 3x the learning rate (1 seed)")
    # the suite decides the run options' defaults: find it first (without -h, so that help lists them all)
    args_pre, _ = ap.parse_known_args([a for a in (sys.argv[1:] if argv is None else argv) if a not in ("-h", "--help")])
    suite = SUITES.get(args_pre.name) if args_pre.name else None
    add_run_options(ap, suite.defaults if suite else Suite.defaults)
    if suite is not None:
        suite.add_options(ap)
    args = ap.parse_args(argv)
    if args.list or not args.name:
        for s in SUITES.values():
            print(f"{s.name:6s} {s.title}")
        return 0 if args.list else 2
    if suite is None:
        print(f"error: unknown suite {args.name!r}; known: {', '.join(SUITES)}", file=sys.stderr)
        return 2
    try:
        if args.quick and "--steps" not in (argv or sys.argv):
            args.steps = suite.quick_steps
        if args.quick and "--eval-every" not in (argv or sys.argv):
            args.eval_every = None  # five evaluations per run, whatever the suite's full-length interval
        base = base_config(args)
        seeds = args.seeds or (1 if args.quick else suite.seeds)
        out = output_folder(args, f"suite/{suite.name}")
        loggers = log_names(args)
        suite.configure(args)
        plan, missing = suite.plan(base, seeds, args.quick)
        if args.lr_sweep:
            specs = sorted({c.optimizer for c in plan}, key=[c.optimizer for c in plan].index)
            sweep = {f"lr={base.lr * f:g}": {"lr": base.lr * f} for f in (0.3, 3.0)}
            plan += plan_matrix(base, specs, 1, sweep)
        preflight(plan, out, resume=args.resume, log=loggers)  # everything checked before the header
    except ValueError as exc:  # UsageError, or a setting plan_matrix refuses
        print(f"error: {exc}", file=sys.stderr)
        return 2
    command = "effopt suite " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"{suite.title}: {len(plan)} runs, {base.steps} steps each -> {out}", flush=True)
    for m in missing:
        print(f"  not measurable here: {m.subject}: {m.reason}")
    try:
        summary = run_matrix(plan, out, resume=args.resume, log=loggers, progress=not args.no_progress, command=command)
    except (FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: continue with  effopt suite {suite.name} ... --out {out} --resume", file=sys.stderr)
        return 130
    report = _write_suite(out, suite, base, missing, args.quick, seeds)
    print(terminal_table(summary["runs"]))
    print()
    for v in json.loads((out / "suite.json").read_text())["verdicts"]:
        print(f"  [{v['verdict']}] {v['criterion']} — {v['subject']}: {v['measured']} {v['reason']}")
    print(f"\nwrote {report}")
    return 1 if summary["errors"] else 0


from . import suite_lr_sweep, suite_p8  # noqa: E402,F401  (register lr-sweep and P8; they build on the classes above)
