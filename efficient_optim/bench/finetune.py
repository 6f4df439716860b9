"""``effopt finetune``: downstream fine-tuning of a small LM the harness pretrained from scratch.

1. Pretrain: one causal LM (``--model`` preset, default gpt2-tiny) trained from scratch by the harness
   (``bench.train.train_run``, the same loop as ``effopt bench``) on ``--pretrain-data`` (default: the shipped
   Tiny Shakespeare), its final weights kept in ``<out>/pretrain/.../final_weights.pt`` and reused by every
   fine-tuning run (and by a later call with the same ``--out``; ``--pretrained DIR`` reuses another folder's).
2. Fine-tune: the LM's body with a linear classification head, per optimizer (any registry spec) and seed,
   on ``--task``: ``shakespeare-order`` (offline, built from the shipped text: original vs shuffled word order),
   or GLUE ``sst2`` / ``mrpc`` through ``datasets`` (online). A from-scratch control (AdamW on a randomly
   initialized LM of the same shape) shows what pretraining is worth.
3. Report: test accuracy per optimizer, mean +- std over seeds, its gap to AdamW and whether that gap is inside
   the seed spread (``finetune.json``, ``finetune.png``, ``report.md``).

    effopt finetune                                           # shakespeare-order, 4 optimizers x 3 seeds
    effopt finetune --quick                                   # seconds: a tiny LM, 2 optimizers, 1 seed
    effopt finetune --optimizers adamw,qadamw4,lion,adafactor --seeds 3 --steps 400
    effopt finetune --task sst2 --pretrain-steps 2000         # online: GLUE SST-2 through datasets

Finished fine-tuning runs are kept in ``<out>/runs/`` and skipped when the command runs again with the same
``--out`` (add optimizers or seeds that way); a different setting in the same folder is refused.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import shlex
import sys
from pathlib import Path

from ..third_party import ChatterLog, chatter_to, quiet
from .classification_data import TASKS, encode, load_task, text_encoder
from .config import MAIN_JOB_LR, RunConfig, slug
from .finetune_run import FinetuneSettings, finetune_once
from .metrics import write_json_atomic
from .options import HelpFormatter, UsageError, check_optimizers

DEFAULT_OPTIMIZERS = ("adamw", "qadamw8", "qadamw4", "hybrid_adam")
QUICK_OPTIMIZERS = ("adamw", "qadamw4")
SCRATCH = "adamw (from scratch)"
SCRATCH_SEED = 10_000  # the control's LM is initialized with this + the fine-tuning seed
QUICK_SHAPE = {"layers": 1, "width": 32, "heads": 2, "context": 32}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="effopt finetune", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--task", choices=TASKS, default="shakespeare-order", help="classification task (default shakespeare-order, offline)")
    ap.add_argument("--optimizers", default=None, help="comma-separated specs for fine-tuning (default: " + ",".join(DEFAULT_OPTIMIZERS)
                    + "; --quick: " + ",".join(QUICK_OPTIMIZERS) + ")")  # fmt: skip
    ap.add_argument("--seeds", type=int, default=None, help="fine-tuning seeds per optimizer (default 3; --quick: 1)")
    ap.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default 200; --quick: 20)")
    ap.add_argument("--batch", type=int, default=None, help="examples per fine-tuning step (default 32; --quick: 16)")
    ap.add_argument("--lr", type=float, default=1e-3, help="fine-tuning peak lr, AdamW scale (Lion 0.1x, SGD 30x; default 1e-3)")
    ap.add_argument("--warmup", type=int, default=None, help="fine-tuning warm-up steps (default 10%% of --steps)")
    ap.add_argument("--weight-decay", type=float, default=0.01, help="fine-tuning weight decay, AdamW scale (default 0.01)")
    ap.add_argument("--train-examples", type=int, default=None, help="at most this many training examples (default 4000; --quick: 200)")
    ap.add_argument("--test-examples", type=int, default=None, help="at most this many test examples (default 1000; --quick: 100)")
    ap.add_argument("--no-scratch", action="store_true", help="skip the from-scratch control")
    ap.add_argument("--model", default="gpt2-tiny", help="LM preset (default gpt2-tiny)")
    for name in ("layers", "width", "heads"):
        ap.add_argument(f"--{name}", type=int, default=None, help=f"override the preset's {name}")
    ap.add_argument("--context", type=int, default=None, help="sequence length of pretraining and fine-tuning (default 64; --quick: 32)")
    ap.add_argument("--pretrain-data", default="tinyshakespeare", help="pretraining corpus, as --data of effopt bench (default tinyshakespeare)")
    ap.add_argument("--tokenizer", choices=("bytes", "bpe"), default="bytes", help="bytes (default) or a BPE trained on the corpus")
    ap.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (default 4096)")
    ap.add_argument("--pretrain-optimizer", default="adamw", help="optimizer spec of the pretraining (default adamw)")
    ap.add_argument("--pretrain-steps", type=int, default=None, help="pretraining steps (default 1000; --quick: 20)")
    ap.add_argument("--pretrain-lr", type=float, default=MAIN_JOB_LR, help=f"pretraining peak lr (default {MAIN_JOB_LR})")
    ap.add_argument("--pretrain-seed", type=int, default=0, help="seed of the pretraining (default 0)")
    ap.add_argument("--pretrained", type=Path, default=None, help="reuse the pretrained LM of this run folder (holding config.json and final_weights.pt)")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    ap.add_argument("--quick", action="store_true", help="seconds: a tiny LM, 2 optimizers, 1 seed (CI's check)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default runs/finetune/<date-time>)")
    return ap


def plan(args) -> dict:
    """Settings of the command from its parsed options; ``UsageError`` for bad values."""
    q = args.quick
    specs = [s for s in (args.optimizers or ",".join(QUICK_OPTIMIZERS if q else DEFAULT_OPTIMIZERS)).split(",") if s.strip()]
    check_optimizers([*specs, args.pretrain_optimizer])
    seeds = args.seeds if args.seeds is not None else (1 if q else 3)
    steps = args.steps or (20 if q else 200)
    if seeds < 1 or steps < 1:
        raise UsageError("--seeds and --steps must be >= 1")
    shape = {k: getattr(args, k) for k in ("layers", "width", "heads", "context")}
    if q:
        shape = {k: v if v is not None else QUICK_SHAPE[k] for k, v in shape.items()}
    pre = RunConfig(optimizer=args.pretrain_optimizer, seed=args.pretrain_seed, model=args.model, data=args.pretrain_data,
                    tokenizer=args.tokenizer, vocab_size=args.vocab_size, context=shape["context"] or 64,
                    layers=shape["layers"], width=shape["width"], heads=shape["heads"], batch_size=8 if q else 16,
                    steps=args.pretrain_steps or (20 if q else 1000), lr=args.pretrain_lr, eval_batches=2 if q else 16,
                    checkpoint_every=0 if q else 250, device=args.device, settings="pretrain")  # fmt: skip
    if args.model == "digits-cnn":
        raise UsageError("--model must be an LM preset (fine-tuning needs a pretrained language model)")
    try:
        pre.validate()
        settings = FinetuneSettings(steps=steps, batch_size=args.batch or (16 if q else 32), lr=args.lr,
                                    warmup=args.warmup if args.warmup is not None else max(1, steps // 10),
                                    weight_decay=args.weight_decay)  # fmt: skip
        settings.validate()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return {"task": args.task, "optimizers": specs, "seeds": seeds, "scratch": not args.no_scratch, "pretrain": pre,
            "settings": settings, "train_examples": args.train_examples or (200 if q else 4000),
            "test_examples": args.test_examples or (100 if q else 1000)}  # fmt: skip


def _pretrained(p: dict, out: Path, given: Path | None) -> tuple[RunConfig, Path, dict]:
    """The pretrained LM: ``(its config, its weights, its summary row)``, trained now if needed."""
    from .trained_models import WEIGHTS_FILE, train_and_keep

    if given is not None:
        cfg_path, weights = given / "config.json", given / WEIGHTS_FILE
        if not cfg_path.is_file() or not weights.is_file():
            raise UsageError(f"--pretrained {given}: needs config.json and {WEIGHTS_FILE} (an LM run of effopt finetune or landscape)")
        row = json.loads((given / "result.json").read_text()) if (given / "result.json").is_file() else {}
        return RunConfig.from_dict(json.loads(cfg_path.read_text())), weights, row
    cfg = p["pretrain"]
    print(f"pretraining {cfg.model} with {cfg.optimizer} on {cfg.data} for {cfg.steps} steps", flush=True)
    with quiet("pretraining"):  # transformers and the optional baselines print while they are imported
        row, weights = train_and_keep(cfg, out / "pretrain" / cfg.run_id)
    if row.get("diverged"):
        raise RuntimeError(f"the pretraining diverged at step {row['diverged_at_step']}; lower --pretrain-lr")
    return cfg, weights, row


def run_finetune(p: dict, out: Path, pretrained: Path | None = None) -> dict:
    """Pretrain (or reuse), then fine-tune every optimizer x seed (and the control); returns ``finetune.json``'s data."""
    from .models import build_lm
    from .trained_models import load_trained

    cfg, weights, pre_row = _pretrained(p, out, pretrained)
    data = load_task(p["task"], p["train_examples"], p["test_examples"])
    enc = text_encoder(cfg.tokenizer, cfg.data, cfg.vocab_size)
    length = cfg.context or 64
    train, test = encode(data.train, enc, length), encode(data.test, enc, length)
    with quiet("loading the pretrained LM"):
        _, lm = load_trained(cfg, weights, cfg.device)
    device = next(lm.parameters()).device
    train, test = tuple(t.to(device) for t in train), tuple(t.to(device) for t in test)
    cases = [(spec, spec, False) for spec in p["optimizers"]] + ([(SCRATCH, "adamw", True)] if p["scratch"] else [])
    results = []
    for label, spec, scratch in cases:
        for seed in range(p["seeds"]):
            path = out / "runs" / slug(label) / f"seed{seed}.json"
            if path.is_file():
                results.append(json.loads(path.read_text()))
                continue
            if scratch:  # the same architecture, randomly initialized (its own seed per fine-tuning seed)
                model = build_lm(cfg.model, lm.config.vocab_size, SCRATCH_SEED + seed, layers=cfg.layers, width=cfg.width,
                                 heads=cfg.heads).to(device)  # fmt: skip
            else:
                model = copy.deepcopy(lm)
            row = {"optimizer": label, "spec": spec, "seed": seed, "pretrained": not scratch,
                   **finetune_once(model, spec, train, test, data.classes, seed, p["settings"])}  # fmt: skip
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, row)
            results.append(row)
            acc = "diverged" if row["test_accuracy"] is None else f"{row['test_accuracy']:.3f}"
            print(f"  {label:28s} seed {seed}: test accuracy {acc}  ({row['seconds']:.0f} s)", flush=True)
    return {"task": {"name": data.name, "description": data.description, "train": len(data.train), "test": len(data.test),
                     "chance": data.chance},
            "pretrain": {"config": cfg.to_dict(), "final_val_loss": pre_row.get("final_val_loss"),
                         "test_loss": pre_row.get("test_loss"), "weights": str(weights)},
            "settings": vars(p["settings"]), "runs": results}  # fmt: skip


def _check_folder(out: Path, p: dict) -> None:
    """Refuse a folder whose earlier runs used other fine-tuning settings or another task."""
    key = {"task": p["task"], "settings": vars(p["settings"]), "pretrain": p["pretrain"].to_dict(),
           "train_examples": p["train_examples"], "test_examples": p["test_examples"]}  # fmt: skip
    path = out / "finetune_plan.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != json.loads(json.dumps(key)):
            diff = sorted(k for k in key if json.dumps(old.get(k)) != json.dumps(key[k]))
            raise UsageError(f"{out} holds fine-tuning runs with other settings ({', '.join(diff)}); use another --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, key)


def main(argv=None) -> int:
    """``effopt finetune``: exit code 0, 1 (a run diverged or failed) or 2 (bad input)."""
    from .finetune_report import write_report

    args = build_parser().parse_args(argv)
    out = args.out or Path("runs") / "finetune" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    with chatter_to(ChatterLog()) as chatter:
        try:
            p = plan(args)
            _check_folder(out, p)
            chatter.keep_in(out / "third_party.log")
            data = run_finetune(p, out, args.pretrained)
        except (UsageError, ValueError, RuntimeError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    data["command"] = "effopt finetune " + shlex.join(sys.argv[1:] if argv is None else argv)
    write_json_atomic(out / "finetune.json", data)
    report = write_report(data, out)
    print(f"\nwrote {out / 'finetune.json'} and {report}")
    return 1 if any(r["test_accuracy"] is None for r in data["runs"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
