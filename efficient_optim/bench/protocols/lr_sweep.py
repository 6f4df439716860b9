"""Learning-rate sensitivity: ``effopt suite lr-sweep``.

Each optimizer runs over a log-spaced grid of peak learning rates (x optional warm-up lengths) x seeds, on
the main job's setting (``effopt bench``'s model, data and steps unless overridden). The report gives, per
optimizer (and warm-up): the curve of final validation loss against lr (``lr_sweep.png``), the best lr, the
basin of lrs within 1 % of the best (its width in decades), the lrs where runs diverged, the largest train
loss spike, and whether each optimizer is "as good as AdamW" (within 1 %) judged at its own best lr, at
AdamW's best lr and at a shared lr (``--lr``, snapped to the grid). Lrs are on AdamW's scale: Lion and SGD
get their usual multipliers (docs/bench.md).

    effopt suite lr-sweep                                   # 4 optimizers x 9 lrs (1e-4..1e-2) x 3 seeds
    effopt suite lr-sweep --quick                           # 2 optimizers x 3 lrs x 1 seed x 20 steps (warm-up 1)
    effopt suite lr-sweep --optimizers adamw --lr-min 3e-4 --lr-max 3e-3 --lr-points 4 --warmups 12,25,50
    effopt suite lr-sweep --out runs/lr --resume            # continue an interrupted sweep

Files: ``lr_sweep.json`` (every point, best lr, basin, divergence, comparisons), ``lr_sweep.png``,
``report.md`` (findings in sentences, then the usual tables) beside the runner's files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .. import lr_sweep_report as words
from ..config import RunConfig
from ..lr_sweep_analysis import BASIN, analyse
from ..metrics import write_json_atomic
from ..options import UsageError, check_optimizers
from ..quick import QUICK
from ..runner import plan_matrix
from .base import INDICATIVE, MET, NOT_MEASURABLE, NOT_MET, Protocol, Verdict

DEFAULT_OPTIMIZERS = ("adamw", "qadamw8", "qadamw4", "hybrid_adam")
QUICK_OPTIMIZERS = ("adamw", "adafactor")


def lr_grid(lo: float, hi: float, points: int) -> list[float]:
    """``points`` learning rates log-spaced from ``lo`` to ``hi`` (both included), 3 significant digits.

    Args:
        lo: the smallest lr (> 0).
        hi: the largest lr (>= ``lo``).
        points: how many (>= 1; 1 gives ``[lo]``).
    """
    if not 0 < lo <= hi or points < 1:
        raise UsageError(f"the lr grid needs 0 < --lr-min <= --lr-max and --lr-points >= 1, got {lo}, {hi}, {points}")
    if points == 1:
        return [float(f"{lo:.3g}")]
    step = math.log10(hi / lo) / (points - 1)
    return [float(f"{lo * 10 ** (i * step):.3g}") for i in range(points)]


def _floats(text: str | None, what: str, cast=float) -> list | None:
    if not text:
        return None
    try:
        values = [cast(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{what} must be a comma-separated list of numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise UsageError(f"{what} must be positive numbers, got {text!r}")
    return values


class LrSweep(Protocol):
    """Final val loss against peak lr per optimizer (and warm-up), over seeds."""

    name = "lr-sweep"
    title = "Learning-rate sensitivity"
    defaults = QUICK
    quick_steps = 20
    seeds = 3

    def __init__(self):
        self.options = {}

    def add_options(self, ap) -> None:
        """The sweep's own options (the grid, the optimizers and the warm-ups)."""
        ap.add_argument("--optimizers", default=None, help="comma-separated specs (default: " + ",".join(DEFAULT_OPTIMIZERS)
                        + "; --quick: " + ",".join(QUICK_OPTIMIZERS) + ")")  # fmt: skip
        ap.add_argument("--lrs", default=None, help="explicit comma-separated peak lrs (overrides --lr-min/--lr-max/--lr-points)")
        ap.add_argument("--lr-min", type=float, default=None, help="smallest lr of the grid (default 1e-4; --quick: --lr / 3)")
        ap.add_argument("--lr-max", type=float, default=None, help="largest lr of the grid (default 1e-2; --quick: --lr x 3)")
        ap.add_argument("--lr-points", type=int, default=None, help="log-spaced grid points (default 9, 4 per decade; --quick: 3)")
        ap.add_argument("--warmups", default=None, help="comma-separated warm-up steps to sweep too (default: --warmup's one value)")

    def configure(self, args) -> None:
        """Keep the parsed sweep options for ``plan``; ``UsageError`` for bad values."""
        specs = [s for s in (args.optimizers or ",".join(QUICK_OPTIMIZERS if args.quick else DEFAULT_OPTIMIZERS)).split(",") if s.strip()]
        check_optimizers(specs)
        lrs = _floats(args.lrs, "--lrs")
        if lrs is None:
            lo, hi, n = (args.lr / 3, args.lr * 3, 3) if args.quick else (1e-4, 1e-2, 9)
            lrs = lr_grid(args.lr_min or lo, args.lr_max or hi, args.lr_points or n)
        warmup = args.warmup
        if args.quick and warmup is not None and warmup >= args.steps:  # the main job's warm-up outlasts a quick run
            warmup = max(1, args.steps // 20)
        self.options = {"optimizers": specs, "lrs": sorted(set(lrs)), "warmups": _floats(args.warmups, "--warmups", int),
                        "warmup": warmup}  # fmt: skip

    def plan(self, base, seeds, quick):
        opts = self.options or {"optimizers": list(QUICK_OPTIMIZERS if quick else DEFAULT_OPTIMIZERS),
                                "lrs": lr_grid(base.lr / 3, base.lr * 3, 3), "warmups": None}  # fmt: skip
        settings = {}
        for warm in opts["warmups"] or [opts.get("warmup", base.warmup_steps)]:
            for lr in opts["lrs"]:
                label = f"lr={lr:g}" + ("" if opts["warmups"] is None else f",warmup={warm}")
                settings[label] = {"lr": lr, "warmup_steps": warm, "log_every": 1}
        return plan_matrix(base, opts["optimizers"], seeds, settings), []

    def verdicts(self, runs, out: Path, base: RunConfig) -> list[Verdict]:
        data = analyse(out, runs, base.lr)
        write_json_atomic(out / "lr_sweep.json", data)
        words.plot_curves(data, out / "lr_sweep.png")
        seeds = max((len(p["losses"]) + p["diverged"] for c in data["curves"] for p in c["points"]), default=0)
        hint = "one seed: a hint, not a finding" if seeds < 2 else ""
        v = []
        for c in data["curves"]:
            name = words.subject(c["optimizer"], c["warmup"], data)
            if c["best_lr"] is None:
                v.append(Verdict("best lr", name, "every lr diverged or failed", NOT_MEASURABLE))
                continue
            v.append(Verdict("best lr (final val loss)", name, f"{c['best_lr']:g}: {words.loss_text(c['best_loss'], c['best_std'])}", "measured", hint))
            if c.get("best_test_loss") is not None:
                v.append(Verdict("test loss at the best lr (the lr chosen on validation)", name,
                                 words.loss_text(c["best_test_loss"], c["best_test_std"]), "measured", hint))  # fmt: skip
            v.append(Verdict(f"basin within {BASIN:.0%} of the best", name, words.basin_text(c), "measured"))
            v.append(Verdict("divergence", name, words.divergence_text(c), "measured"))
        for r in data["comparisons"]:
            name = words.subject(r["optimizer"], r["warmup"], data)
            for key, where in (("own_best_gap", "each at its own best lr"), ("at_reference_best_gap", "at AdamW's best lr"),
                               ("shared_gap", f"at the shared lr {r['shared_lr']:g}")):  # fmt: skip
                gap = r[key]
                crit = f"as good as AdamW (val loss within {BASIN:.0%}), {where}"
                if gap is None:
                    v.append(Verdict(crit, name, "n/a", NOT_MEASURABLE, "a seed diverged or did not run at that lr"))
                else:
                    verdict = MET if gap <= BASIN else NOT_MET
                    if hint:  # one seed: the direction only
                        verdict, why = INDICATIVE, f"one seed: points to '{verdict}'; the seed spread is unknown"
                    else:
                        why = words.spread_text(r, key)
                    v.append(Verdict(crit, name, f"{gap * 100:+.2f}%", verdict, why))
        return v

    def sections(self, runs, out: Path, base: RunConfig) -> list[str]:
        """``report.md``'s findings and the per-lr table (read from ``lr_sweep.json``)."""
        path = out / "lr_sweep.json"
        data = json.loads(path.read_text()) if path.is_file() else analyse(out, runs, base.lr)
        return [words.findings_markdown(data), words.points_markdown(data), "![lr_sweep](lr_sweep.png)\n"]


PROTOCOL = LrSweep()
