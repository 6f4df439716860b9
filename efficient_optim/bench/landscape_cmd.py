"""``effopt landscape``: the loss landscape around the solutions different optimizers reach from the same start.

1. Train: every optimizer (registry specs) x seed on the main job's setting (``effopt bench``'s model, data,
   schedule) through the harness (``bench.train.train_run``), keeping each run's final weights. Runs of one
   seed share the model's initialization and the batch order: they differ only by the optimizer.
2. Mode connectivity: the train and validation loss along the straight line from the first optimizer's
   solution to each other's (same seed), and the *barrier*: the largest excess of the path's loss over the
   straight line between its two end losses (``analysis.landscape.barrier``). A control pair, the first
   optimizer's solutions of seeds 0 and 1 (different initializations), shows what a barrier between two
   unrelated solutions looks like.
3. 2-D surfaces (Li et al. 2018): the train loss on a grid around each optimizer's seed-0 solution along two
   random directions normalized filter by filter to that solution, and the mean loss rise at distances 0.25,
   0.5 and 1 (flatness).

    effopt landscape                                  # adamw vs qadamw4, 3 seeds, main job (a few minutes)
    effopt landscape --quick                          # seconds: a tiny model, 1 seed + the control seed, 7x7 grid
    effopt landscape --optimizers adamw,qadamw4,hybrid_adam --data tinyshakespeare --points 25

Files: ``landscape.json``, ``landscape_interpolation.png``, ``landscape_surface.png``, ``report.md``; the runs
under ``<out>/runs/`` are reused when the command runs again with the same ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import shlex
import sys
import time
from pathlib import Path

from ..third_party import ChatterLog, chatter_to, quiet
from .config import MAIN_JOB_LR, MAIN_JOB_WARMUP
from .metrics import write_json_atomic
from .options import HelpFormatter, UsageError, check_optimizers

DEFAULT_OPTIMIZERS = ("adamw", "qadamw4")
LOSS_BATCH_SEED = 2468  # the fixed training batches the landscape's train loss is measured on
DIRECTION_SEED = 1357  # the random directions of the 2-D surfaces (the same raw draw for every solution)
RADII = (0.25, 0.5, 1.0)
QUICK_SHAPE = {"layers": 1, "width": 32, "heads": 2, "context": 16, "batch_size": 4, "steps": 20}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="effopt landscape", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--optimizers", default=",".join(DEFAULT_OPTIMIZERS),
                    help="comma-separated specs; the first is the reference of the interpolations (default adamw,qadamw4)")  # fmt: skip
    ap.add_argument("--seeds", type=int, default=None, help="seeds (shared init and batch order per seed; default 3; --quick: 2)")
    ap.add_argument("--data", default="embedded", help="corpus, as effopt bench --data (default embedded)")
    ap.add_argument("--model", default="gpt2-tiny", help="LM preset (default gpt2-tiny)")
    for name in ("layers", "width", "heads", "context"):
        ap.add_argument(f"--{name}", type=int, default=None, help=f"override the preset's {name} (context default 64)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 250, the main job's; --quick: 20)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default 16)")
    ap.add_argument("--lr", type=float, default=MAIN_JOB_LR, help=f"peak lr, AdamW scale (default {MAIN_JOB_LR})")
    ap.add_argument("--warmup", type=int, default=None, help=f"warm-up steps (default {MAIN_JOB_WARMUP}; --quick: 2)")
    ap.add_argument("--points", type=int, default=None, help="grid points per axis of a surface, odd (default 21; --quick: 7)")
    ap.add_argument("--span", type=float, default=1.0, help="half-width of a surface in filter-normalized units (default 1)")
    ap.add_argument("--path-points", type=int, default=None, help="points on an interpolation path (default 21; --quick: 5)")
    ap.add_argument("--loss-batches", type=int, default=None, help="fixed training batches of the landscape's train loss (default 4)")
    ap.add_argument("--eval-batches", type=int, default=None, help="validation batches per evaluation (default 8)")
    ap.add_argument("--surface-seeds", type=int, default=1, help="seeds whose solutions get a 2-D surface (default 1: seed 0)")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    ap.add_argument("--quick", action="store_true", help="seconds: CI's check that everything runs")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default runs/landscape/<date-time>)")
    return ap


def plan(args) -> dict:
    """The command's settings from its options; ``UsageError`` for bad values."""
    from .quick import QUICK

    q = args.quick
    specs = [s for s in args.optimizers.split(",") if s.strip()]
    if len(specs) < 2:
        raise UsageError("--optimizers needs at least two specs (the first is the reference)")
    check_optimizers(specs)
    shape = {k: getattr(args, k) for k in ("layers", "width", "heads", "context")}
    if q:
        shape = {k: v if v is not None else QUICK_SHAPE[k] for k, v in shape.items()}
    base = dataclasses.replace(QUICK, model=args.model, data=args.data, context=shape["context"] or QUICK.context,
                               layers=shape["layers"], width=shape["width"], heads=shape["heads"],
                               steps=args.steps or (QUICK_SHAPE["steps"] if q else QUICK.steps),
                               batch_size=args.batch or (QUICK_SHAPE["batch_size"] if q else QUICK.batch_size), lr=args.lr,
                               warmup_steps=args.warmup if args.warmup is not None else (2 if q else MAIN_JOB_WARMUP),
                               eval_batches=args.eval_batches or (2 if q else 8), checkpoint_every=0 if q else 100,
                               device=args.device, settings="landscape")  # fmt: skip
    s = {"optimizers": specs, "seeds": args.seeds if args.seeds is not None else (2 if q else 3), "base": base,
         "points": args.points or (7 if q else 21), "span": args.span, "path_points": args.path_points or (5 if q else 21),
         "loss_batches": args.loss_batches or (2 if q else 4), "surface_seeds": args.surface_seeds}  # fmt: skip
    if args.model == "digits-cnn":
        raise UsageError("--model must be an LM preset")
    if s["seeds"] < 1 or s["points"] < 3 or s["points"] % 2 == 0 or s["path_points"] < 2 or s["loss_batches"] < 1:
        raise UsageError("--seeds >= 1, --points odd and >= 3, --path-points >= 2 and --loss-batches >= 1 are needed")
    if not s["span"] > 0 or s["surface_seeds"] < 0:
        raise UsageError("--span must be > 0 and --surface-seeds >= 0")
    try:
        base.validate()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return s


class Solutions:
    """The trained solutions of one run of the command: their weights, one carrier model, and the losses.

    Args:
        s: the settings from ``plan``.
        out: the output folder (runs go to ``out/runs``).
    """

    def __init__(self, s: dict, out: Path):
        self.s, self.out = s, out
        self.weights: dict[tuple[str, int], object] = {}
        self.rows: dict[tuple[str, int], dict] = {}
        self.task = self.model = self.batches = None

    def train(self, say) -> None:
        """Train (or reuse) every optimizer x seed, keeping the final weights."""
        import torch

        from .trained_models import load_trained, train_and_keep

        for seed in range(self.s["seeds"]):
            for spec in self.s["optimizers"]:
                cfg = dataclasses.replace(self.s["base"], optimizer=spec, seed=seed)
                with quiet("training"):
                    row, path = train_and_keep(cfg, self.out / "runs" / cfg.run_id)
                self.rows[(spec, seed)] = row
                say(f"trained {spec} seed {seed}: val loss {row['final_val_loss'] if not row['diverged'] else 'diverged'}")
                if self.task is None:
                    with quiet("loading a model"):
                        self.task, self.model = load_trained(cfg, path, cfg.device)
                    self.model.eval()
                    gen = torch.Generator().manual_seed(LOSS_BATCH_SEED)
                    self.batches = [self.task.train_batch(gen) for _ in range(self.s["loss_batches"])]
                self.weights[(spec, seed)] = [t.to(next(self.model.parameters()).device)
                                              for t in _ordered(torch.load(path, weights_only=True), self.model)]  # fmt: skip

    @property
    def params(self):
        return list(self.model.parameters())

    def train_loss(self) -> float:
        import torch

        with torch.no_grad():
            return sum(float(self.task.loss(self.model, b)) for b in self.batches) / len(self.batches)

    def val_loss(self) -> float:
        from .trained_models import no_autocast

        return float(self.task.evaluate(self.model, no_autocast)["val_loss"])


def _ordered(state: dict, model) -> list:
    """The tensors of a saved ``state_dict`` in ``model.parameters()`` order (tied weights once)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [state[names[id(p)]] for p in model.parameters()]


def _pair(sol: Solutions, a: tuple[str, int], b: tuple[str, int]) -> dict:
    from ..analysis.landscape import barrier, interpolate

    path = interpolate({"train": sol.train_loss, "val": sol.val_loss}, sol.params, sol.weights[a], sol.weights[b],
                       sol.s["path_points"])  # fmt: skip
    return {"a": a[0], "seed_a": a[1], "b": b[0], "seed_b": b[1], "path": path,
            "train_barrier": barrier(path["t"], path["train"]), "val_barrier": barrier(path["t"], path["val"])}  # fmt: skip


def run_landscape(s: dict, out: Path) -> dict:
    """Train, interpolate, draw surfaces; returns ``landscape.json``'s data."""
    import torch

    from ..analysis.landscape import filter_normalized_direction, rise_at_radius, surface_2d

    t0 = time.perf_counter()

    def say(text):
        print(f"  {time.perf_counter() - t0:6.1f} s  {text}", flush=True)

    sol = Solutions(s, out)
    sol.train(say)
    ref, others = s["optimizers"][0], s["optimizers"][1:]
    ok = {k for k, r in sol.rows.items() if not r["diverged"]}
    pairs = [_pair(sol, (ref, seed), (o, seed)) for seed in range(s["seeds"]) for o in others
             if {(ref, seed), (o, seed)} <= ok]  # fmt: skip
    say(f"{len(pairs)} interpolation paths")
    control = _pair(sol, (ref, 0), (ref, 1)) if {(ref, 0), (ref, 1)} <= ok else None
    surfaces = []
    for seed in range(min(s["surface_seeds"], s["seeds"])):
        for spec in s["optimizers"]:
            if (spec, seed) not in ok:
                continue
            theta = sol.weights[(spec, seed)]
            gen = torch.Generator().manual_seed(DIRECTION_SEED)
            d1, d2 = filter_normalized_direction(theta, gen), filter_normalized_direction(theta, gen)
            with torch.no_grad():
                for p, t in zip(sol.params, theta):
                    p.copy_(t)
            surf = surface_2d(sol.train_loss, sol.params, d1, d2, s["span"], s["points"])
            surfaces.append({"optimizer": spec, "seed": seed, **surf,
                             "rise": {str(r): rise_at_radius(surf, r) for r in RADII if r <= s["span"]}})  # fmt: skip
            say(f"surface of {spec} seed {seed}")
    runs = [{"optimizer": k[0], "seed": k[1], "final_val_loss": r.get("final_val_loss"), "final_train_loss": r.get("final_train_loss"),
             "test_loss": r.get("test_loss"), "diverged": r["diverged"]} for k, r in sol.rows.items()]  # fmt: skip
    return {"settings": {**{k: v for k, v in s.items() if k != "base"}, "base": s["base"].to_dict()}, "runs": runs,
            "pairs": pairs, "control": control, "surfaces": surfaces, "seconds": time.perf_counter() - t0}  # fmt: skip


def main(argv=None) -> int:
    """``effopt landscape``: exit code 0, or 2 for bad input."""
    from .landscape_report import write_report

    args = build_parser().parse_args(argv)
    out = args.out or Path("runs") / "landscape" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    with chatter_to(ChatterLog()) as chatter:
        try:
            s = plan(args)
            out.mkdir(parents=True, exist_ok=True)
            chatter.keep_in(out / "third_party.log")
            print(f"effopt landscape: {', '.join(s['optimizers'])} x {s['seeds']} seed(s) -> {out}", flush=True)
            data = run_landscape(s, out)
        except (UsageError, ValueError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    data["command"] = "effopt landscape " + shlex.join(sys.argv[1:] if argv is None else argv)
    write_json_atomic(out / "landscape.json", data)
    report = write_report(data, out)
    print(f"\nwrote {out / 'landscape.json'} and {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
