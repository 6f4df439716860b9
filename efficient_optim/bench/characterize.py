"""``effopt characterize``: why low-bit optimizer states fail, and what fixes them (protocols P2, P5, P6).

One command trains the tiny LM through the benchmark harness's runner (``runner.run_matrix`` / ``train_run``:
resumable, measured) with a ``StateProbeCallback`` on every run (``bench.probe_callback``), then writes ``report.md``, ``characterization.json`` and PNG figures:

- **core**: fp32 AdamW, QAdamW 8-bit, and *naive 4-bit* (linear maps — the v map has a zero level —,
  blocks of 2048, round-to-nearest);
- **fixes alone** on naive 4-bit: small blocks (128), a zero-free v map (linear or square-law), companding
  of m (softsign map), stochastic rounding, error correction of m every K = 10 / 100 / 1000 steps, learned
  (k-means) codebooks;
- **fixes on a zero-free base**: naive 4-bit whose v map has no zero (the one fix without which nothing
  trains), plus each other fix: how much of the remaining gap each one recovers;
- **combined**: the library's 4-bit default and all fixes together (with and without learned codebooks);
- **naive at other learning rates** (and, if naive 4-bit trains fine, an escalation to the setting where
  it fails: larger learning rate, more steps); fp32 at half and twice the learning rate (the scale of a gap);
- **per-layer sensitivity**: one layer group at a time at 4 bits (``--sensitivity-preset``), the rest in fp32.

    effopt characterize                          # the full study (time: BENCHMARKS.md, 'Characterization study')
    effopt characterize --quick                  # a short smoke version
    effopt characterize --out runs/char --resume # continue an interrupted study
    effopt characterize --seeds 3 --resume --out runs/char   # add seeds to the core configurations
    effopt characterize --report-only --out runs/char         # rebuild the report from the files
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from ..analysis.characterization import layer_depth, layer_group  # noqa: F401  (re-exported)
from ..registry import NAIVE_4BIT, SENSITIVITY_PRESETS
from ..third_party import ChatterLog, chatter_to, quiet
from .callbacks import Callback
from .config import RunConfig
from .metrics import write_json_atomic
from .options import HelpFormatter, UsageError, add_run_options, base_config, output_folder
from .preflight import preflight
from .probe_callback import StateProbeCallback
from .runner import load_plan, run_matrix

# ------------------------------------------------------------------------------------ configurations
NAIVE = NAIVE_4BIT
ZERO_FREE_BASE = SENSITIVITY_PRESETS["zerofree"]
SMALL_BLOCKS = {"m_block_size": 128, "v_block_size": 128}
ALL_FIXES = {"bits": 4, "m_block_size": 128, "v_block_size": 128, "m_map": "softsign", "v_map": "sqrt_nozero",
             "m_rounding": "stochastic", "v_rounding": "nearest", "m_correct_every": 10}  # fmt: skip
ALL_LEARNED = {"bits": 4, "m_block_size": 128, "v_block_size": 128, "m_map": "learned", "v_map": "learned",
               "m_rounding": "stochastic", "v_rounding": "nearest", "m_correct_every": 10}  # fmt: skip

# fix name -> (description, settings added to a base)
FIXES = {
    "small_blocks": ("small blocks (128 instead of 2048)", SMALL_BLOCKS),
    "v_linear_nozero": ("zero-free v map (linear, no zero level)", {"v_map": "linear_nozero"}),
    "v_sqrt_nozero": ("zero-free v map (square-law, no zero level)", {"v_map": "sqrt_nozero"}),
    "companding": ("companded m map (softsign)", {"m_map": "softsign"}),
    "stochastic": ("stochastic rounding (m and v)", {"rounding": "stochastic"}),
    "ec10": ("error correction of m, K=10", {"m_correct_every": 10}),
    "ec100": ("error correction of m, K=100", {"m_correct_every": 100}),
    "ec1000": ("error correction of m, K=1000", {"m_correct_every": 1000}),
    "learned": ("learned k-means codebooks (m and v)", {"m_map": "learned", "v_map": "learned"}),
}
STAGE2_FIXES = ("small_blocks", "companding", "stochastic", "ec10", "ec100", "ec1000", "learned")

# per-layer sensitivity presets: the 4-bit settings the selected group gets (the rest stays fp32)
QUICK_FIXES = ("ec10", "learned")
QUICK_STAGE2 = ("stochastic", "ec10")


def qspec(settings: dict) -> str:
    """A ``qadamw`` spec from settings (keys in a fixed order, so the same settings give the same spec)."""
    return "qadamw+" + "+".join(f"{k}={settings[k]}" for k in sorted(settings))


@dataclasses.dataclass
class Entry:
    """One configuration of the study."""

    key: str
    label: str
    stage: str  # core, fix, stage2, combined, lr, control, escalation, sensitivity
    spec: str
    fix: str | None = None
    group: str | None = None
    overrides: dict = dataclasses.field(default_factory=dict)  # RunConfig fields (lr, steps, ...)
    core: bool = False  # run over every seed


def configurations(quick: bool, base_lr: float) -> list[Entry]:
    """Every configuration of the study except sensitivity (which needs the model's parameter names)."""
    out = [
        Entry("fp32", "fp32 AdamW", "core", "adamw", core=True),
        Entry("8bit", "8-bit (QAdamW default)", "core", "qadamw8", core=True),
        Entry("naive4", "naive 4-bit", "core", qspec(NAIVE), core=True),
    ]
    for fix in QUICK_FIXES if quick else FIXES:
        if fix == "v_linear_nozero":  # = the zero-free base below (same spec): reported in both places
            continue
        text, extra = FIXES[fix]
        out.append(Entry(f"naive+{fix}", f"naive 4-bit + {text}", "fix", qspec({**NAIVE, **extra}), fix=fix))
    out.append(Entry("zerofree", "zero-free base (naive 4-bit, v map linear_nozero)", "stage2", qspec(ZERO_FREE_BASE),
                     fix="v_linear_nozero", core=True))  # fmt: skip
    for fix in QUICK_STAGE2 if quick else STAGE2_FIXES:
        text, extra = FIXES[fix]
        out.append(Entry(f"zerofree+{fix}", f"zero-free base + {text}", "stage2", qspec({**ZERO_FREE_BASE, **extra}), fix=fix))
    out.append(Entry("default4", "4-bit library default (block 128, v sqrt_nozero, stochastic m)", "combined", "qadamw4", core=True))
    if not quick:
        out.append(Entry("all_fixes", "all fixes (block 128, softsign m, sqrt_nozero v, stochastic m, EC K=10)", "combined",
                         qspec(ALL_FIXES), core=True))  # fmt: skip
        out.append(Entry("all_learned", "all fixes with learned codebooks (block 128, stochastic m, EC K=10)", "combined",
                         qspec(ALL_LEARNED)))  # fmt: skip
        for f in (0.1, 0.3):
            lr = base_lr * f
            out.append(Entry(f"naive4@lr={lr:g}", f"naive 4-bit at lr {lr:g}", "lr", qspec(NAIVE), overrides={"lr": lr}))
        for f in (0.5, 2.0):  # how far the learning rate alone moves fp32: the scale of a "gap"
            lr = base_lr * f
            out.append(Entry(f"fp32@lr={lr:g}", f"fp32 AdamW at lr {lr:g}", "control", "adamw", overrides={"lr": lr}))
    return out


# --------------------------------------------------------------------------------- layer groups
def _param_names(cfg: RunConfig) -> list[tuple[str, tuple]]:
    """Names and shapes of the trainable parameters of ``cfg``'s model, in ``model.parameters()`` order."""
    from .tasks import build_task

    task = build_task(dataclasses.replace(cfg, device="cpu"), torch.device("cpu"))
    model = task.build_model()
    return [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad]


def sensitivity_entries(names: list[tuple[str, tuple]], preset: str, min_numel: int = 4096) -> list[Entry]:
    """One entry per layer group holding at least one quantizable matrix, plus the all-fp32 baseline."""
    groups: dict[str, list[int]] = {}
    for i, (n, shape) in enumerate(names):
        numel = 1
        for s in shape:
            numel *= s
        if numel >= min_numel:
            groups.setdefault(layer_group(n), []).append(i)
    out = [Entry("sens:none", "sensitivity baseline (every group fp32, same optimizer class)", "sensitivity",
                 f"qadamw_partial+preset={preset}+select=none", group="none")]  # fmt: skip
    for g, idx in groups.items():
        sel = ".".join(str(i) for i in idx)
        out.append(Entry(f"sens:{g}", f"{g} at 4 bits ({preset})", "sensitivity", f"qadamw_partial+preset={preset}+select={sel}", group=g))
    return out


# ------------------------------------------------------------------------------------------ probes
@dataclasses.dataclass
class ProbeSettings:
    every: int = 25
    early: int = 10
    lowrank_every: int = 100
    sharpness_every: int = 100
    sharpness_iters: int = 10
    sharpness_keys: tuple = ("fp32", "8bit", "default4", "zerofree", "all_fixes")


class _RunLine(Callback):
    """Prints one line per finished run: its configuration, seed, result and wall time."""

    def __init__(self, label: str, log):
        self.label, self.log, self.t0 = label, log, 0.0

    def on_run_start(self, ctx) -> None:
        self.t0 = time.time()

    def on_run_end(self, ctx, result: dict) -> None:
        status = (f"diverged at step {result['diverged_at_step']}" if result["diverged"]
                  else f"val loss {result['final_val_loss']:.4f}")  # fmt: skip
        self.log(f"  {self.label} (seed {ctx.cfg.seed}): {status} [{time.time() - self.t0:.0f} s]")


def probe_callbacks(entries: dict[str, Entry], probe: ProbeSettings, log=print):
    """``callbacks(cfg)`` for the runner: a ``StateProbeCallback`` on every run of the study (with sharpness for
    ``probe.sharpness_keys``) and a line per finished run. ``entries``: configuration key -> entry."""

    def make(cfg: RunConfig) -> list[Callback]:
        sharp = cfg.settings in probe.sharpness_keys
        state = StateProbeCallback(every=probe.every, early=probe.early, lowrank_every=probe.lowrank_every,
                                   sharpness_every=probe.sharpness_every if sharp else 0,
                                   sharpness_iters=probe.sharpness_iters)  # fmt: skip
        return [state, _RunLine(entries[cfg.settings].label, log)]

    return make


# --------------------------------------------------------------------------------------- the study
def plan_study(base: RunConfig, entries: list[Entry], seeds: int) -> list[tuple[Entry, RunConfig]]:
    """``(entry, config)`` pairs: core entries over ``seeds`` seeds, the others seed 0. A run's ``settings``
    label is its entry's key, so every run folder says which configuration of the study it is."""
    plan = []
    for e in entries:
        for seed in range(seeds if e.core else 1):
            cfg = dataclasses.replace(base, optimizer=e.spec, seed=seed, settings=e.key, **e.overrides)
            cfg.validate()
            plan.append((e, cfg))
    return plan


def _merge_plan(out: Path, plan: list[tuple[Entry, RunConfig]], resume: bool) -> list[tuple[Entry, RunConfig]]:
    """Write ``plan.json`` (the harness's format) and ``study.json`` (the entries); on resume keep the runs
    planned before and add the new ones."""
    study_path = out / "study.json"
    if (out / "plan.json").is_file():
        if not resume:
            raise FileExistsError(f"{out} already holds runs: pass --resume to continue them, or choose another --out")
        old_entries = {d["key"]: Entry(**d) for d in json.loads(study_path.read_text())["entries"]} if study_path.is_file() else {}
        new_entries = {e.key: e for e, _ in plan}
        old_cfgs = load_plan(out)
        known = {c.run_id for c in old_cfgs}
        merged = [(old_entries.get(c.settings) or new_entries[c.settings], c) for c in old_cfgs
                  if c.settings in old_entries or c.settings in new_entries]  # fmt: skip
        plan = merged + [(e, c) for e, c in plan if c.run_id not in known]
    out.mkdir(parents=True, exist_ok=True)
    entries = list({e.key: e for e, _ in plan}.values())
    write_json_atomic(out / "plan.json", {"runs": [c.to_dict() for _, c in plan]})
    write_json_atomic(study_path, {"entries": [dataclasses.asdict(e) for e in entries]})
    return plan


def run_study(plan: list[tuple[Entry, RunConfig]], out: Path, probe: ProbeSettings, *, progress: bool = True,
              command: str | None = None, log=print) -> dict:  # fmt: skip
    """Train every planned run with probes through the harness's runner (``runner.run_matrix``: finished runs are
    skipped, unfinished ones resume; a failing run is recorded, not fatal). ``plan.json`` and ``study.json`` must
    be written first (``_merge_plan``)."""
    entries = {e.key: e for e, _ in plan}
    return run_matrix([c for _, c in plan], out, resume=True, progress=progress, command=command,
                      callbacks=probe_callbacks(entries, probe, log))  # fmt: skip


def _escalation(base: RunConfig, out: Path, plan) -> list[Entry]:
    """If naive 4-bit trained fine (no divergence, val-loss gap < 2 %), the settings to try next."""
    from .characterize_report import load_rows

    rows = load_rows(out)
    naive, fp32 = rows.get("naive4", []), rows.get("fp32", [])
    if not naive or not fp32 or any(r["diverged"] for r in naive) or fp32[0]["final_val_loss"] is None:
        return []
    if naive[0]["final_val_loss"] / fp32[0]["final_val_loss"] - 1 >= 0.02:
        return []
    out_e = []
    for f in (3.0, 10.0):
        lr = base.lr * f
        out_e.append(Entry(f"naive4@lr={lr:g}", f"naive 4-bit at lr {lr:g}", "escalation", qspec(NAIVE), overrides={"lr": lr}))
        out_e.append(Entry(f"fp32@lr={lr:g}", f"fp32 AdamW at lr {lr:g}", "escalation", "adamw", overrides={"lr": lr}))
    steps = base.steps * 3
    out_e.append(Entry(f"naive4@steps={steps}", f"naive 4-bit, {steps} steps", "escalation", qspec(NAIVE), overrides={"steps": steps}))
    out_e.append(Entry(f"fp32@steps={steps}", f"fp32 AdamW, {steps} steps", "escalation", "adamw", overrides={"steps": steps}))
    return out_e


DEFAULTS = RunConfig(model="gpt2-tiny", layers=4, context=64, batch_size=16, steps=300, lr=3e-3, eval_every=50,
                     checkpoint_every=100, log_every=10)  # fmt: skip
QUICK = {"steps": 40, "eval_every": 20, "checkpoint_every": 20, "layers": 2, "width": 64, "heads": 2, "eval_batches": 4}  # argparse dests


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="effopt characterize", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short version: smaller model, 40 steps, fewer configurations")
    ap.add_argument("--seeds", type=int, default=1, help="seeds of the core configurations (default 1; the ablations run seed 0)")
    ap.add_argument("--no-sensitivity", action="store_true", help="skip the per-layer sensitivity runs")
    ap.add_argument("--sensitivity-preset", choices=sorted(SENSITIVITY_PRESETS), default="zerofree",
                    help="4-bit settings of the layer group under test (default zerofree: naive 4-bit with a zero-free "
                    "v map, which degrades without diverging, so per-group gaps are graded)")  # fmt: skip
    ap.add_argument("--probe-every", type=int, default=None, help="probe every N steps (default 25; --quick 5)")
    ap.add_argument("--no-sharpness", action="store_true", help="skip the Hessian power iterations")
    ap.add_argument("--synthetic-steps", type=int, default=None,
                    help="steps of the synthetic error-correction sequence (P5; default 2000; --quick 200; 0 skips it)")  # fmt: skip
    ap.add_argument("--only", default=None, help="comma-separated configuration keys to run (a key ending in * or : is a prefix), e.g. fp32,naive4,sens:")
    ap.add_argument("--report-only", action="store_true", help="rebuild report.md, plots and characterization.json from --out")
    add_run_options(ap, DEFAULTS)
    return ap


def _base_config(args: argparse.Namespace, argv_list: list[str]) -> tuple[RunConfig, Path]:
    """The study's base run and output folder (``--quick`` defaults applied); ``UsageError`` for bad input."""
    if args.quick:
        for dest, value in QUICK.items():
            flag = "--" + dest.replace("_", "-")
            if not any(a == flag or a.startswith(flag + "=") for a in argv_list):
                setattr(args, dest, value)
    base = base_config(args)
    if args.log:
        raise UsageError("--log is not supported by effopt characterize (its records are in each run's probes.jsonl)")
    if base.grad_release:
        raise UsageError("--grad-release steps parameters inside backward, where the probes, which run around "
                         "optimizer.step(), cannot see them: characterize without it")  # fmt: skip
    if args.seeds < 1:
        raise UsageError("--seeds must be >= 1")
    out = output_folder(args, "characterize")
    preflight([base], out, resume=args.resume)  # device, model, data and --out, before the model is built
    return base, out


def _probe_settings(args: argparse.Namespace) -> ProbeSettings:
    probe = ProbeSettings(every=args.probe_every or (5 if args.quick else 25), early=5 if args.quick else 10,
                          lowrank_every=20 if args.quick else 100, sharpness_every=20 if args.quick else 100,
                          sharpness_iters=3 if args.quick else 10)  # fmt: skip
    if args.no_sharpness:
        probe.sharpness_keys = ()
    if args.quick:
        probe.sharpness_keys = ("fp32",) if not args.no_sharpness else ()
    return probe


def _entries(args: argparse.Namespace, base: RunConfig) -> list[Entry]:
    """The configurations to run: the study's, the sensitivity runs, filtered by ``--only`` (``UsageError`` if
    nothing is left)."""
    entries = configurations(args.quick, base.lr)
    if not args.no_sensitivity:
        sens = sensitivity_entries(_param_names(base), args.sensitivity_preset)
        entries += sens[:3] if args.quick else sens
    if args.only:
        keys = [k.strip() for k in args.only.split(",") if k.strip()]
        entries = [e for e in entries if any(e.key == k or (k.endswith(("*", ":")) and e.key.startswith(k.rstrip("*")))
                                             for k in keys)]  # fmt: skip
        if not entries:
            raise UsageError(f"--only {args.only!r} matches no configuration")
    return entries


def _synthetic(args: argparse.Namespace, out: Path) -> None:
    """The synthetic error-correction experiment (``analysis.ema_error``), once per study folder."""
    from ..analysis.ema_error import synthetic_ema_errors

    path = out / "p5_synthetic.json"
    steps = args.synthetic_steps if args.synthetic_steps is not None else (200 if args.quick else 2000)
    if not path.is_file() and steps > 0:
        print("P5 on a synthetic gradient sequence (error accumulation with and without correction)...", flush=True)
        write_json_atomic(path, synthetic_ema_errors(steps=steps, numel=2048 if args.quick else 8192))


def main(argv=None) -> int:
    """``effopt characterize``: exit code 0, 1 (a run failed), 2 (bad input) or 130 (interrupted). What
    transformers and the optional baselines print while imported goes to ``<out>/third_party.log``."""
    with chatter_to(ChatterLog()) as chatter:
        return _main(argv, chatter)


def _main(argv, chatter: ChatterLog) -> int:
    from .characterize_report import write_report

    args = _parser().parse_args(argv)
    argv_list = sys.argv[1:] if argv is None else list(argv)
    if args.report_only:
        if args.out is None or not (args.out / "study.json").is_file():
            print("error: --report-only needs --out: a folder of effopt characterize", file=sys.stderr)
            return 2
        print(f"wrote {write_report(args.out)}")
        return 0
    command = "effopt characterize " + shlex.join(argv_list)
    try:
        base, out = _base_config(args, argv_list)
        probe = _probe_settings(args)
        study = plan_study(base, _entries(args, base), args.seeds)
        with quiet("checking the plan: model, data and optimizers"):
            preflight([c for _, c in study], out, resume=args.resume)  # every configuration's optimizer spec
        plan = _merge_plan(out, study, args.resume)
    except (FileExistsError, ValueError) as exc:  # UsageError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_json_atomic(out / "study_base.json", {"base": base.to_dict(), "quick": args.quick, "seeds": args.seeds,
                                                "sensitivity_preset": args.sensitivity_preset,
                                                "probe": dataclasses.asdict(probe), "command": command})  # fmt: skip
    print(f"effopt characterize: {len(plan)} runs, {base.steps} steps each ({base.model}, {base.layers or 'preset'} layers) -> {out}", flush=True)
    chatter.keep_in(out / "third_party.log")
    try:
        run_study(plan, out, probe, progress=not args.no_progress, command=command)
        extra = _escalation(base, out, plan)
        if extra:
            print("naive 4-bit did not fail here: escalating (larger learning rate, more steps)", flush=True)
            plan = _merge_plan(out, plan + plan_study(base, extra, 1), True)
            run_study(plan, out, probe, progress=not args.no_progress, command=command)
    except KeyboardInterrupt:
        print(f"\ninterrupted: continue with  effopt characterize ... --out {out} --resume", file=sys.stderr)
        return 130
    _synthetic(args, out)
    print(f"\nwrote {write_report(out, redraw=False)}")
    summary = json.loads((out / "summary.json").read_text())
    return 1 if summary["errors"] else 0
