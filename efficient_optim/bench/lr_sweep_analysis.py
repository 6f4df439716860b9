"""The numbers of a learning-rate sweep, from its run folder: curves, best lr, basin, divergence, comparisons.

Everything here reads what the runner wrote (``plan.json``, ``*/result.json``, ``*/metrics.jsonl``), so a
report can be rebuilt from a finished, interrupted or copied folder. A *curve* is one optimizer spec at one
warm-up length over the lr grid; a *point* is one lr of a curve, over its seeds.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import RunConfig
from .metrics import MetricsLog
from .runner import load_plan

BASIN = 0.01  # the basin: lrs whose mean final val loss is within 1 % of the curve's best
SPIKE = 1.5  # a train loss above 1.5x its running minimum counts as a spike


@dataclass
class Point:
    """One lr of a curve: the final val losses of the seeds that finished, and how many diverged."""

    lr: float
    losses: list[float] = field(default_factory=list)
    diverged: int = 0
    spikes: list[float] = field(default_factory=list)
    spike_steps: list[int] = field(default_factory=list)
    test_losses: list[float] = field(default_factory=list)  # the held-out test split's, where the runs had one

    @property
    def runs(self) -> int:
        return len(self.losses) + self.diverged

    @property
    def ok(self) -> bool:
        """Every seed finished (none diverged) and there is at least one."""
        return self.diverged == 0 and bool(self.losses)

    @property
    def mean(self) -> float | None:
        return statistics.mean(self.losses) if self.losses else None

    @property
    def std(self) -> float | None:
        """Sample std over seeds; ``None`` with fewer than two seeds."""
        return statistics.stdev(self.losses) if len(self.losses) >= 2 else None


def warmup_of(cfg: RunConfig) -> int:
    """The warm-up length a run used (``None`` in the config means 5 % of the steps, at least 1)."""
    return cfg.warmup_steps if cfg.warmup_steps is not None else max(1, cfg.steps // 20)


def spike_ratio(out: Path, run_id: str) -> tuple[float, int]:
    """The largest train loss over its running minimum so far, and its step (``(1.0, 0)`` without a log).

    Args:
        out: the sweep's folder.
        run_id: the run's folder under ``out``.
    """
    path = out / run_id / "metrics.jsonl"
    if not path.is_file():
        return 1.0, 0
    low, worst, at = math.inf, 1.0, 0
    for rec in MetricsLog(path).read():
        loss = rec.get("train_loss") if rec.get("kind") in ("train", "diverged") else None
        if loss is None or not math.isfinite(loss):
            continue
        if low < math.inf and loss / low > worst:
            worst, at = loss / low, rec["step"]
        low = min(low, loss)
    return worst, at


def collect_points(out: Path, runs: list[dict]) -> dict[tuple[str, int], list[Point]]:
    """``(optimizer spec, warm-up steps) -> points sorted by lr`` from the finished runs in ``out``.

    Args:
        out: the sweep's folder (its ``plan.json`` gives each run's lr and warm-up).
        runs: the finished runs' rows (``summary.json["runs"]``).
    """
    cfgs = {c.run_id: c for c in load_plan(out)}
    curves: dict[tuple[str, int], dict[float, Point]] = {}
    for row in runs:
        cfg = cfgs.get(row["run_id"])
        if cfg is None:
            continue
        point = curves.setdefault((cfg.optimizer, warmup_of(cfg)), {}).setdefault(cfg.lr, Point(cfg.lr))
        if row["diverged"] or row.get("final_val_loss") is None:
            point.diverged += 1
        else:
            point.losses.append(row["final_val_loss"])
            if row.get("test_loss") is not None:
                point.test_losses.append(row["test_loss"])
        ratio, step = spike_ratio(out, row["run_id"])
        point.spikes.append(ratio)
        point.spike_steps.append(step)
    return {key: [pts[lr] for lr in sorted(pts)] for key, pts in curves.items()}


def summarize_curve(points: list[Point]) -> dict:
    """Best lr, the basin within ``BASIN`` of the best, and the divergence boundaries of one curve.

    Args:
        points: the curve's points, sorted by lr.

    Returns a dict: ``best_lr``/``best_loss``/``best_std`` (``None`` if no lr finished every seed; the best
    lr is chosen on validation loss), ``best_test_loss``/``best_test_std`` (the test split's loss at that lr:
    ``None`` without a test split),
    ``basin_lo``/``basin_hi`` (the contiguous run of grid lrs around the best within 1 %),
    ``basin_decades`` (log10 of their ratio), ``basin_open_low``/``basin_open_high`` (the basin reaches the
    grid's edge, so the true basin is wider), ``diverged`` (``[lr, diverged seeds, runs]`` per lr with any
    divergence), ``diverges_above`` (the lowest lr above the best with a divergence) and
    ``diverges_below`` (the highest lr below the best with one).
    """
    ok = [i for i, p in enumerate(points) if p.ok]
    res = {"best_lr": None, "best_loss": None, "best_std": None, "best_test_loss": None, "best_test_std": None,
           "basin_lo": None, "basin_hi": None,
           "basin_decades": None, "basin_open_low": False, "basin_open_high": False,
           "diverged": [[p.lr, p.diverged, p.runs] for p in points if p.diverged],
           "diverges_above": None, "diverges_below": None}  # fmt: skip
    if not ok:
        return res
    b = min(ok, key=lambda i: points[i].mean)
    best = points[b]
    res.update(best_lr=best.lr, best_loss=best.mean, best_std=best.std)
    if best.test_losses:
        res.update(best_test_loss=statistics.mean(best.test_losses),
                   best_test_std=statistics.stdev(best.test_losses) if len(best.test_losses) > 1 else None)  # fmt: skip
    inside = lambda i: points[i].ok and points[i].mean <= best.mean * (1 + BASIN)  # noqa: E731
    lo = hi = b
    while lo > 0 and inside(lo - 1):
        lo -= 1
    while hi < len(points) - 1 and inside(hi + 1):
        hi += 1
    res.update(basin_lo=points[lo].lr, basin_hi=points[hi].lr, basin_decades=math.log10(points[hi].lr / points[lo].lr),
               basin_open_low=lo == 0, basin_open_high=hi == len(points) - 1)  # fmt: skip
    above = [p.lr for p in points[b + 1 :] if p.diverged]
    below = [p.lr for p in points[:b] if p.diverged]
    res.update(diverges_above=min(above) if above else None, diverges_below=max(below) if below else None)
    return res


def nearest_lr(points: list[Point], lr: float) -> Point | None:
    """The curve's point whose lr is nearest ``lr`` in log scale (``None`` for an empty curve)."""
    return min(points, key=lambda p: abs(math.log(p.lr / lr)), default=None)


def _gap(a: Point | None, b: Point | None) -> float | None:
    """Relative gap of ``a``'s mean over ``b``'s (``None`` when either has a diverged seed or no run)."""
    if a is None or b is None or not a.ok or not b.ok:
        return None
    return a.mean / b.mean - 1


def _spread(a: Point | None, b: Point | None) -> float | None:
    """The seed spread of a gap: both points' stds combined, relative to ``b``'s mean (``None`` with < 2 seeds)."""
    if a is None or b is None or a.std is None or b.std is None or not b.mean:
        return None
    return math.hypot(a.std, b.std) / b.mean


def compare(curves: dict[tuple[str, int], list[Point]], summaries: dict, shared_lr: float,
            reference: str = "adamw") -> list[dict]:  # fmt: skip
    """Each non-reference curve against the reference's curve at the same warm-up.

    Args:
        curves: ``collect_points``'s result.
        summaries: ``summarize_curve`` per key of ``curves``.
        shared_lr: the lr both are judged at (the grid lr nearest to it is used).
        reference: the optimizer spec to compare against. Default ``adamw``.

    Returns one dict per compared curve: ``own_best_gap`` (best vs best), ``shared_gap`` (at the shared
    lr), ``at_reference_best_gap`` (at the reference's best lr), each with its seed spread (``<gap>_spread``:
    both stds combined, relative; ``None`` with one seed), the lrs used, and both sides' seed std at the best.
    """
    rows = []
    for (spec, warm), points in curves.items():
        ref = curves.get((reference, warm))
        if spec == reference or ref is None:
            continue
        s, r = summaries[(spec, warm)], summaries[(reference, warm)]
        own = r["best_loss"] and s["best_loss"] and s["best_loss"] / r["best_loss"] - 1
        mine, theirs = nearest_lr(points, shared_lr), nearest_lr(ref, shared_lr)
        at_ref, at_ref_spread = None, None
        if r["best_lr"] is not None:
            pair = nearest_lr(points, r["best_lr"]), nearest_lr(ref, r["best_lr"])
            at_ref, at_ref_spread = _gap(*pair), _spread(*pair)
        own_spread = None
        if s["best_lr"] is not None and r["best_lr"] is not None:
            own_spread = _spread(nearest_lr(points, s["best_lr"]), nearest_lr(ref, r["best_lr"]))
        rows.append({"optimizer": spec, "warmup": warm, "reference": reference,
                     "own_best_gap": own if s["best_loss"] and r["best_loss"] else None,
                     "best_lr": s["best_lr"], "reference_best_lr": r["best_lr"],
                     "shared_lr": mine.lr if mine else None, "shared_gap": _gap(mine, theirs),
                     "at_reference_best_gap": at_ref, "best_std": s["best_std"], "own_best_gap_spread": own_spread,
                     "shared_gap_spread": _spread(mine, theirs), "at_reference_best_gap_spread": at_ref_spread,
                     "reference_best_std": r["best_std"]})  # fmt: skip
    return rows


def analyse(out: Path, runs: list[dict], shared_lr: float) -> dict:
    """The whole sweep as plain data (what ``lr_sweep.json`` holds).

    Args:
        out: the sweep's folder.
        runs: the finished runs' rows.
        shared_lr: the lr at which every optimizer is also compared (the grid lr nearest to it).
    """
    curves = collect_points(out, runs)
    summaries = {k: summarize_curve(v) for k, v in curves.items()}
    return {
        "basin_tolerance": BASIN, "spike_threshold": SPIKE, "shared_lr": shared_lr,
        "curves": [{"optimizer": k[0], "warmup": k[1], **summaries[k],
                    "points": [{**asdict(p), "mean": p.mean, "std": p.std} for p in v]}
                   for k, v in curves.items()],
        "comparisons": compare(curves, summaries, shared_lr),
    }  # fmt: skip
