"""``effopt theory``: convergence and error-propagation checks on problems with known optima.

Three studies (``efficient_optim.analysis.theory``; what each measures and the model it checks: docs/theory.md):

- ``convergence``: every optimizer (registry specs, ours or baselines) on a rotated quadratic of controlled
  condition number, noisy least squares and L2-regularized logistic regression, at a constant learning rate:
  the rate (steps per decade of distance to the optimum), the error floor, the relative update error against
  the optimizer's exact-state reference (QAdamW/HybridAdam -> AdamW, Lion 8-bit -> Lion, SGD 8-bit -> SGD),
  and whether the additive-error model predicts the rate and the floor from that error.
- ``ema``: quantization error accumulated in the moment EMAs (m: beta 0.9; v: beta 0.999) against the
  geometric-sum predictions for independent and aligned errors, for bf16, 8-bit, 4-bit, 4-bit stochastic and
  4-bit with error feedback.
- ``bits``: reachable epsilon against bits (2-8), nearest vs stochastic rounding, with and without error
  feedback, for weights and for the momentum stored at b bits, against the representability bound.

    effopt theory                                   # all three, the default optimizers (a few minutes)
    effopt theory --quick                           # seconds: 4 optimizers, one problem, short runs
    effopt theory --parts bits,ema --out runs/theory
    effopt theory --parts convergence --optimizers adamw,qadamw4+m_rounding=nearest --problems quadratic --kappas 10,1000

Files in ``--out``: ``theory.json`` (every measurement), ``theory_convergence.png``, ``theory_ema.png``,
``theory_bits.png`` and ``report.md`` (findings in sentences, then tables).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

from ..registry import create_optimizer, optimizer_entry
from .config import LR_SCALE, parse_spec
from .metrics import write_json_atomic
from .options import HelpFormatter, UsageError, check_optimizers

PARTS = ("convergence", "ema", "bits")
DEFAULT_OPTIMIZERS = ("sgd", "sgd8", "adamw", "qadamw8", "qadamw4", "hybrid_adam", "lion", "lion8", "adafactor")
QUICK_OPTIMIZERS = ("sgd", "sgd8", "adamw", "qadamw4")
# The exact-state optimizer each compressed one is compared with (same update rule, fp32 states).
REFERENCES = {"qadamw": "adamw", "qadamw8": "adamw", "qadamw4": "adamw", "hybrid_adam": "adamw", "lowrank_adam": "adamw",
              "adamw_bnb_8bit": "adamw", "adamw_torchao_8bit": "adamw", "adamw_torchao_4bit": "adamw",
              "lion8": "lion", "lion_bnb_8bit": "lion", "sgd8": "sgd"}  # fmt: skip


def _csv(text: str, what: str, cast=str) -> list:
    try:
        values = [cast(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{what} must be a comma-separated list, got {text!r}") from None
    if not values:
        raise UsageError(f"{what} names nothing")
    return values


def optimizer_cases(specs: list[str], lr: float, references: dict[str, str]):
    """``OptimizerCase``s for ``specs`` (and their references, added when missing) at AdamW-scale ``lr``.

    Each runs at ``lr`` times the harness's multiplier for its rule (Lion 0.1x, SGD 30x; ``+lr=`` in a spec
    overrides), with weight decay 0 (the problems' optima assume none). A reference gets the same learning
    rate and those of the spec's settings it accepts (``betas``, ``eps``, ``momentum``, ...).
    """
    from ..analysis.theory.study import OptimizerCase

    check_optimizers(specs)
    refs = {s: references.get(s, references.get(parse_spec(s)[0])) for s in specs}
    for ref in refs.values():
        if ref is not None and ref not in specs:
            check_optimizers([ref])
            specs = [ref, *specs]
    cases, lrs = [], {}
    for spec in specs:
        name, kwargs = parse_spec(spec)
        if kwargs.get("weight_decay", 0) != 0:
            raise UsageError(f"{spec}: weight decay moves the optimum these problems are built around; leave it at 0")
        kwargs = {"lr": lr * LR_SCALE.get(name, 1.0), **kwargs, "weight_decay": 0.0}
        lrs[spec] = kwargs["lr"]

        def make(params, name=name, kwargs=kwargs):
            return create_optimizer(name, params, **kwargs)

        cases.append(OptimizerCase(spec, make, refs.get(spec), kwargs["lr"]))
    by_label = {c.label: c for c in cases}
    for c in cases:  # the reference runs at the case's learning rate, with the settings it accepts
        if c.reference is not None:
            ref_name, ref_kwargs = parse_spec(c.reference)
            valid = optimizer_entry(ref_name).keywords()
            shared = {k: v for k, v in parse_spec(c.label)[1].items() if valid is None or k in valid}
            if shared or lrs[c.label] != lrs[c.reference]:
                label = f"{c.reference} (lr {lrs[c.label]:g}" + "".join(f", {k}={v}" for k, v in shared.items()) + ")"
                kw = {**ref_kwargs, **shared, "lr": lrs[c.label], "weight_decay": 0.0}
                if label not in by_label:
                    by_label[label] = OptimizerCase(label, lambda p, n=ref_name, kw=kw: create_optimizer(n, p, **kw), None, kw["lr"])
                c.reference = label
    return list(by_label.values())


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="effopt theory", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated: convergence, ema, bits (default: all)")
    ap.add_argument("--optimizers", default=None, help="comma-separated registry specs (default: " + ",".join(DEFAULT_OPTIMIZERS)
                    + "; --quick: " + ",".join(QUICK_OPTIMIZERS) + "); references are added")  # fmt: skip
    ap.add_argument("--references", default="", help="extra SPEC=REFERENCE pairs, comma-separated (default: QAdamW, HybridAdam "
                    "and the 8-bit baselines -> adamw, lion8 -> lion, sgd8 -> sgd)")  # fmt: skip
    ap.add_argument("--problems", default="quadratic,least_squares,logistic", help="comma-separated (default: all three)")
    ap.add_argument("--kappas", default=None, help="condition numbers of the quadratic and least squares (default 10,1000; --quick: 10)")
    ap.add_argument("--steps", type=int, default=None, help="steps per convergence run (default 3000; --quick: 300)")
    ap.add_argument("--lr", type=float, default=1e-2, help="learning rate on AdamW's scale (Lion 0.1x, SGD 30x; default 1e-2)")
    ap.add_argument("--ema-steps", type=int, default=None, help="EMA updates for v (beta 0.999; m gets a fifth; default 5000; --quick: 1000)")
    ap.add_argument("--bits-steps", type=int, default=None, help="iterations per bits-vs-epsilon run (default 2000; --quick: 200)")
    ap.add_argument("--bits-kappa", type=float, default=100.0, help="condition number of the bits study's quadratic (default 100)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the problems and gradient streams (default 0)")
    ap.add_argument("--quick", action="store_true", help="a few seconds: CI's check that everything runs")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default runs/theory/<date-time>)")
    ap.add_argument("--report-only", action="store_true", help="rebuild report.md and the figures from --out's theory.json")
    return ap


def resolve(args) -> dict:
    """The run's settings from the parsed options (``UsageError`` for bad values)."""
    parts = _csv(args.parts, "--parts")
    bad = sorted(set(parts) - set(PARTS))
    if bad:
        raise UsageError(f"unknown --parts {', '.join(bad)}; choose from {', '.join(PARTS)}")
    from ..analysis.theory.problems import PROBLEM_NAMES

    problems = _csv(args.problems, "--problems")
    bad = sorted(set(problems) - set(PROBLEM_NAMES))
    if bad:
        raise UsageError(f"unknown --problems {', '.join(bad)}; choose from {', '.join(PROBLEM_NAMES)}")
    q = args.quick
    s = {"parts": parts, "problems": problems,
         "optimizers": _csv(args.optimizers or ",".join(QUICK_OPTIMIZERS if q else DEFAULT_OPTIMIZERS), "--optimizers"),
         "kappas": _csv(args.kappas or ("10" if q else "10,1000"), "--kappas", float),
         "steps": args.steps or (300 if q else 3000), "lr": args.lr, "seed": args.seed,
         "ema_steps": args.ema_steps or (1000 if q else 5000), "bits_steps": args.bits_steps or (200 if q else 2000),
         "bits_kappa": args.bits_kappa, "quick": q}  # fmt: skip
    for key in ("steps", "ema_steps", "bits_steps"):
        if s[key] < 20:
            raise UsageError(f"--{key.replace('_', '-')} must be >= 20, got {s[key]}")
    if any(k < 1 for k in s["kappas"]) or s["bits_kappa"] < 1:
        raise UsageError("condition numbers (--kappas, --bits-kappa) must be >= 1")
    if not s["lr"] > 0:
        raise UsageError(f"--lr must be > 0, got {s['lr']}")
    pairs = [p.split("=", 1) for p in _csv(args.references, "--references")] if args.references.strip() else []
    if any(len(p) != 2 for p in pairs):
        raise UsageError(f"--references must be SPEC=REFERENCE pairs, got {args.references!r}")
    s["references"] = {**REFERENCES, **dict(pairs)}
    return s


def run_studies(s: dict, out: Path) -> dict:
    """Run the selected parts with settings ``s`` (from ``resolve``) and return ``theory.json``'s data.

    The 64 x 64 problems run on one thread (more threads only add synchronization); the caller's thread
    count is restored afterwards.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_parts(s)
    finally:
        torch.set_num_threads(threads)


def _run_parts(s: dict) -> dict:
    from ..analysis.theory import problems as P
    from ..analysis.theory.study import bits_study, convergence_study, ema_study

    t0 = time.perf_counter()
    data: dict = {"settings": {k: v for k, v in s.items() if k != "references"}, "references": s["references"]}

    def say(text):
        print(f"  {time.perf_counter() - t0:6.1f} s  {text}", flush=True)

    if "convergence" in s["parts"]:
        cases = optimizer_cases(s["optimizers"], s["lr"], s["references"])
        probs = []
        for name in s["problems"]:
            kappas = s["kappas"] if name != "logistic" else [None]
            probs += [P.logistic(seed=s["seed"]) if k is None else P.build_problem(name, k, s["seed"]) for k in kappas]
        data["convergence"] = convergence_study(probs, cases, s["steps"], progress=say)
    if "ema" in s["parts"]:
        regimes = ("signal",) if s["quick"] else ("noise", "signal")
        data["ema"] = ema_study(max(20, s["ema_steps"] // 5), s["ema_steps"], regimes, s["seed"], progress=say)
    if "bits" in s["parts"]:
        bits = (2, 4, 8) if s["quick"] else tuple(range(2, 9))
        data["bits"] = bits_study(P.quadratic(kappa=s["bits_kappa"], seed=s["seed"]), s["bits_steps"], bits, progress=say)
    data["seconds"] = time.perf_counter() - t0
    return data


def write_outputs(data: dict, out: Path) -> Path:
    """``theory.json``, the figures and ``report.md`` in ``out``; returns the report's path."""
    from ..analysis.theory import figures
    from ..analysis.theory.report import report_markdown

    write_json_atomic(out / "theory.json", data)
    made = {}
    for part, fn in (("convergence", figures.plot_convergence), ("ema", figures.plot_ema), ("bits", figures.plot_bits)):
        if part in data:
            made[part] = fn(data[part], out / f"theory_{part}.png")
    path = out / "report.md"
    path.write_text(report_markdown(data, {k: v.name for k, v in made.items() if v is not None}))
    return path


def main(argv=None) -> int:
    """``effopt theory``: exit code 0, or 2 for bad input."""
    ap = build_parser()
    args = ap.parse_args(argv)
    out = args.out or Path("runs") / "theory" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        if args.report_only:
            if not (out / "theory.json").is_file():
                raise UsageError(f"--report-only needs --out with a theory.json; {out / 'theory.json'} does not exist")
            print(f"wrote {write_outputs(json.loads((out / 'theory.json').read_text()), out)}")
            return 0
        settings = resolve(args)
        if "convergence" in settings["parts"]:
            optimizer_cases(settings["optimizers"], settings["lr"], settings["references"])  # checks the specs now
    except (UsageError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    print(f"effopt theory: {', '.join(settings['parts'])} -> {out}", flush=True)
    data = run_studies(settings, out)
    data["command"] = "effopt theory " + shlex.join(sys.argv[1:] if argv is None else argv)
    path = write_outputs(data, out)
    print(f"\nwrote {out / 'theory.json'} and {path} ({data['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
