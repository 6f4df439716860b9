"""``effopt characterize``: why low-bit optimizer states fail, and what fixes them (protocols P2, P5, P6).

One command trains the tiny LM through the benchmark harness (``train_run``: resumable, measured) with a
``StateProbe`` attached to every run, then writes ``report.md``, ``characterization.json`` and PNG figures:

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
import re
import shlex
import sys
import time
import traceback
from pathlib import Path

import torch

from ..registry import list_optimizers, register_optimizer
from .config import RunConfig
from .metrics import write_json_atomic
from .options import HelpFormatter, UsageError, add_run_options, base_config, output_folder
from .preflight import preflight
from .runner import collect_summary, load_plan
from .train import ConfigMismatch, train_run

# ------------------------------------------------------------------------------------ configurations
NAIVE = {"bits": 4, "m_map": "linear", "v_map": "linear", "m_block_size": 2048, "v_block_size": 2048, "rounding": "nearest"}
ZERO_FREE_BASE = {**NAIVE, "v_map": "linear_nozero"}
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
SENSITIVITY_PRESETS = {"naive": NAIVE, "zerofree": ZERO_FREE_BASE, "default4": {"bits": 4}}
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
_DEPTH = re.compile(r"\.(?:h|layers|layer|blocks)\.(\d+)\.")


def layer_group(name: str) -> str:
    """Coarse group of a parameter name: ``wte``/``wpe``/``embedding``, ``h.<i>.attn``, ``h.<i>.mlp``,
    ``h.<i>.norm``, ``head``, ``norm`` or ``other``."""
    m = _DEPTH.search(name)
    low = name.lower()
    if "attn" in low or "attention" in low:
        kind = "attn"
    elif "mlp" in low or "ffn" in low or "feed_forward" in low:
        kind = "mlp"
    elif "ln" in low or "norm" in low:
        kind = "norm"
    elif "wte" in low:
        kind = "wte"
    elif "wpe" in low:
        kind = "wpe"
    elif "embed" in low:
        kind = "embedding"
    elif "lm_head" in low or "head" in low:
        kind = "head"
    else:
        kind = "other"
    return f"h.{m.group(1)}.{kind}" if m else kind


def layer_depth(name: str) -> int | None:
    m = _DEPTH.search(name)
    return int(m.group(1)) if m else None


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


def _partial_factory(params, *, select: str = "none", preset: str = "zerofree", **kw):
    """QAdamW with the parameters at indices ``select`` (dot-separated, or ``none``) stored with the
    ``SENSITIVITY_PRESETS[preset]`` settings and every other parameter in fp32. Parameter order is kept
    (one param group per contiguous run), so probes can name parameters by position."""
    from ..optim.qadamw import QAdamW

    if preset not in SENSITIVITY_PRESETS:
        raise ValueError(f"invalid preset: {preset!r} (choose one of {sorted(SENSITIVITY_PRESETS)})")
    params = list(params)
    chosen = set() if str(select) == "none" else {int(s) for s in str(select).split(".") if s != ""}
    if any(i >= len(params) for i in chosen):
        raise ValueError(f"select {select!r} names a parameter beyond the {len(params)} given")
    low = SENSITIVITY_PRESETS[preset]
    groups, run, run_sel = [], [], None
    for i, p in enumerate(params):
        sel = i in chosen
        if run and sel != run_sel:
            groups.append({"params": run, **(low if run_sel else {})})
            run = []
        run.append(p)
        run_sel = sel
    if run:
        groups.append({"params": run, **(low if run_sel else {})})
    kw.setdefault("bits", 32)
    return QAdamW(groups, **kw)


if "qadamw_partial" not in list_optimizers():
    register_optimizer("qadamw_partial", _partial_factory,
                       "QAdamW with chosen parameters (by index) at 4-bit presets, the rest fp32 (effopt characterize)")  # fmt: skip


# ------------------------------------------------------------------------------------------ probes
@dataclasses.dataclass
class ProbeSettings:
    every: int = 25
    early: int = 10
    lowrank_every: int = 100
    sharpness_every: int = 100
    sharpness_iters: int = 10
    sharpness_keys: tuple = ("fp32", "8bit", "default4", "zerofree", "all_fixes")


def _sharpness_fn(cfg: RunConfig, named: list[tuple[str, torch.Tensor]], iters: int):
    """Top Hessian eigenvalue of the training loss on one fixed batch, at the live parameters."""
    from torch.func import functional_call
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ..analysis.sharpness import hessian_top_eigenvalue
    from .tasks import build_task
    from .train import resolve_device

    device = named[0][1].device if named else resolve_device(cfg.device)
    task = build_task(cfg, device)
    twin = task.build_model().to(device=device, dtype=named[0][1].dtype)
    batch = task.train_batch(torch.Generator().manual_seed(4321))
    params = dict(named)

    def loss_fn():
        with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention kernel has no double backward
            return task.loss(_Reparam(twin, params, functional_call), batch)

    return lambda: hessian_top_eigenvalue(loss_fn, list(params.values()), iters=iters)


class _Reparam:
    """Calls ``twin`` with the live parameters (``task.loss(model, batch)`` calls ``model(x)``)."""

    def __init__(self, twin, params, functional_call):
        self.twin, self.params, self.call = twin, params, functional_call

    def __call__(self, *args, **kwargs):
        return self.call(self.twin, self.params, args, kwargs)


def train_probed(cfg: RunConfig, run_dir: Path, names: list[tuple[str, tuple]], probe: ProbeSettings,
                 sharpness: bool, progress=None) -> dict:  # fmt: skip
    """``train_run`` with a ``StateProbe`` attached to the run's optimizer (``run_dir/probes.jsonl``).

    The harness builds the optimizer itself, so the probe is attached through torch's global optimizer
    step hooks to the first optimizer that steps during this call; parameters are named by position.
    """
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    from ..analysis.probe import StateProbe

    holder: dict = {}

    def get_probe(opt):
        if "probe" not in holder:
            params = [p for g in opt.param_groups for p in g["params"]]
            if len(params) == len(names) and all(tuple(p.shape) == s for p, (_, s) in zip(params, names)):
                named = [(n, p) for (n, _), p in zip(names, params)]
            else:
                named = None
            fn = _sharpness_fn(cfg, named, probe.sharpness_iters) if sharpness and named else None
            holder["probe"] = StateProbe(
                opt, named, path=run_dir / "probes.jsonl", every=probe.every, early=probe.early,
                lowrank_every=probe.lowrank_every, sharpness_fn=fn,
                sharpness_every=probe.sharpness_every if fn else 0, clip=cfg.clip if cfg.clip > 0 else None,
            )  # fmt: skip
        return holder["probe"] if holder["probe"].optimizer is opt else None

    def pre(opt, args, kwargs):
        p = get_probe(opt)
        if p is not None:
            p.pre_step()

    def post(opt, args, kwargs):
        p = holder.get("probe")
        if p is not None and p.optimizer is opt:
            p.post_step()

    h1, h2 = register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)
    try:
        row = train_run(cfg, run_dir, progress=progress)
    finally:
        h1.remove()
        h2.remove()
    if "probe" in holder:
        overhead = {"probe_overhead_s": holder["probe"].overhead_s}
        path = run_dir / "probe_overhead.json"
        old = json.loads(path.read_text()) if path.is_file() else {"probe_overhead_s": 0.0}
        write_json_atomic(path, {"probe_overhead_s": old["probe_overhead_s"] + overhead["probe_overhead_s"]})
    return row


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


def run_study(plan: list[tuple[Entry, RunConfig]], out: Path, names, probe: ProbeSettings, *, progress: bool = True,
              command: str | None = None, log=print) -> dict:  # fmt: skip
    """Train every planned run (skipping finished ones) with probes; a failing run is recorded, not fatal."""
    todo = [(e, c) for e, c in plan if not (out / c.run_id / "result.json").is_file()]
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(c.steps for _, c in todo), unit="step", file=sys.stderr, dynamic_ncols=True, leave=False)
    cfgs = [c for _, c in plan]
    try:
        for e, cfg in todo:
            run_dir = out / cfg.run_id
            (run_dir / "error.txt").unlink(missing_ok=True)
            t0 = time.time()
            try:
                row = train_probed(cfg, run_dir, names, probe, e.key in probe.sharpness_keys, bar)
                status = f"diverged at step {row['diverged_at_step']}" if row["diverged"] else f"val loss {row['final_val_loss']:.4f}"
            except (KeyboardInterrupt, ConfigMismatch):
                raise
            except Exception:
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / "error.txt").write_text(traceback.format_exc())
                status = "failed: " + traceback.format_exc().strip().splitlines()[-1]
            log(f"  {e.label} (seed {cfg.seed}): {status} [{time.time() - t0:.0f} s]")
            write_json_atomic(out / "summary.json", collect_summary(out, cfgs, command))
    finally:
        if bar is not None:
            bar.close()
    summary = collect_summary(out, cfgs, command)
    write_json_atomic(out / "summary.json", summary)
    return summary


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


def main(argv=None) -> int:
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
                    help="steps of the synthetic P5 sequence (default 2000; --quick 200; 0 skips it)")  # fmt: skip
    ap.add_argument("--only", default=None, help="comma-separated configuration keys to run (a key ending in * or : is a prefix), e.g. fp32,naive4,sens:")
    ap.add_argument("--report-only", action="store_true", help="rebuild report.md, plots and characterization.json from --out")
    add_run_options(ap, DEFAULTS)
    args = ap.parse_args(argv)
    argv_list = sys.argv[1:] if argv is None else list(argv)
    from .characterize_report import write_report

    if args.report_only:
        if args.out is None or not (args.out / "study.json").is_file():
            print("error: --report-only needs --out: a folder of effopt characterize", file=sys.stderr)
            return 2
        path = write_report(args.out)
        print(f"wrote {path}")
        return 0
    try:
        if args.quick:
            for dest, value in QUICK.items():
                flag = "--" + dest.replace("_", "-")
                if not any(a == flag or a.startswith(flag + "=") for a in argv_list):
                    setattr(args, dest, value)
        base = base_config(args)
        if args.log:
            raise UsageError("--log is not supported by effopt characterize (its records are in each run's probes.jsonl)")
        if base.grad_release:
            raise UsageError("--grad-release steps parameters inside backward, around the optimizer's step hooks the "
                             "probes use: characterize without it")  # fmt: skip
        if args.seeds < 1:
            raise UsageError("--seeds must be >= 1")
        out = output_folder(args, "characterize")
        preflight([base], out, resume=args.resume)  # device, model, data and --out, before the model is built
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    probe = ProbeSettings(every=args.probe_every or (5 if args.quick else 25), early=5 if args.quick else 10,
                          lowrank_every=20 if args.quick else 100, sharpness_every=20 if args.quick else 100,
                          sharpness_iters=3 if args.quick else 10)  # fmt: skip
    if args.no_sharpness:
        probe.sharpness_keys = ()
    if args.quick:
        probe.sharpness_keys = ("fp32",) if not args.no_sharpness else ()
    names = _param_names(base)
    entries = configurations(args.quick, base.lr)
    if not args.no_sensitivity:
        sens = sensitivity_entries(names, args.sensitivity_preset)
        if args.quick:
            sens = sens[:3]
        entries += sens
    if args.only:
        keys = [k.strip() for k in args.only.split(",") if k.strip()]
        entries = [e for e in entries if any(e.key == k or (k.endswith(("*", ":")) and e.key.startswith(k.rstrip("*")))
                                             for k in keys)]  # fmt: skip
        if not entries:
            print(f"error: --only {args.only!r} matches no configuration", file=sys.stderr)
            return 2
    command = "effopt characterize " + shlex.join(argv_list)
    try:
        study = plan_study(base, entries, args.seeds)
        preflight([c for _, c in study], out, resume=args.resume)  # every configuration's optimizer spec
        plan = _merge_plan(out, study, args.resume)
    except (FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_json_atomic(out / "study_base.json", {"base": base.to_dict(), "quick": args.quick, "seeds": args.seeds,
                                                "sensitivity_preset": args.sensitivity_preset,
                                                "probe": dataclasses.asdict(probe), "command": command})  # fmt: skip
    print(f"effopt characterize: {len(plan)} runs, {base.steps} steps each ({base.model}, {base.layers or 'preset'} layers) -> {out}", flush=True)
    try:
        run_study(plan, out, names, probe, progress=not args.no_progress, command=command)
        extra = _escalation(base, out, plan)
        if extra:
            print("naive 4-bit did not fail here: escalating (larger learning rate, more steps)", flush=True)
            plan = _merge_plan(out, plan + plan_study(base, extra, 1), True)
            run_study(plan, out, names, probe, progress=not args.no_progress, command=command)
    except KeyboardInterrupt:
        print(f"\ninterrupted: continue with  effopt characterize ... --out {out} --resume", file=sys.stderr)
        return 130
    synthetic = out / "p5_synthetic.json"
    syn_steps = args.synthetic_steps if args.synthetic_steps is not None else (200 if args.quick else 2000)
    if not synthetic.is_file() and syn_steps > 0:
        from .characterize_report import p5_synthetic

        print("P5 on a synthetic gradient sequence (error accumulation with and without correction)...", flush=True)
        write_json_atomic(synthetic, p5_synthetic(steps=syn_steps, numel=2048 if args.quick else 8192))
    path = write_report(out, redraw=False)
    print(f"\nwrote {path}")
    summary = json.loads((out / "summary.json").read_text())
    return 1 if summary["errors"] else 0


