"""``report.md`` and ``finetune.png`` of ``effopt finetune``, from its ``finetune.json`` data."""

from __future__ import annotations

import math
from pathlib import Path

from .metrics import mean_std

REFERENCE = "adamw"


def aggregate(runs: list[dict]) -> list[dict]:
    """Per optimizer (in first-seen order): test accuracy mean and sample std over seeds, seeds, diverged."""
    out = {}
    for r in runs:
        a = out.setdefault(r["optimizer"], {"optimizer": r["optimizer"], "accs": [], "diverged": 0, "pretrained": r["pretrained"],
                                            "state_bytes": r["state_bytes"], "train_losses": []})  # fmt: skip
        if r["test_accuracy"] is None:
            a["diverged"] += 1
        else:
            a["accs"].append(r["test_accuracy"])
            a["train_losses"].append(r["train_loss"])
    rows = []
    for a in out.values():
        mean, std = mean_std(a["accs"])
        rows.append({**a, "mean": mean, "std": std, "seeds": len(a["accs"]) + a["diverged"],
                     "train_loss": mean_std(a["train_losses"])[0]})  # fmt: skip
    return rows


def _acc(mean, std, n) -> str:
    if mean is None:
        return "diverged"
    return f"{100 * mean:.1f} %" + (f" ± {100 * std:.1f}" if n > 1 else "")


def compare(rows: list[dict], reference: str = REFERENCE) -> dict[str, dict]:
    """Gap of each optimizer's mean accuracy to the reference's (percentage points) and whether it is inside
    the combined seed spread ``sqrt(std_a^2 + std_b^2)``; ``None`` fields without seeds to compare."""
    ref = next((r for r in rows if r["optimizer"] == reference), None)
    out = {}
    for r in rows:
        if ref is None or r is ref or r["mean"] is None or ref["mean"] is None:
            continue
        gap = 100 * (r["mean"] - ref["mean"])
        spread = 100 * math.hypot(r["std"], ref["std"]) if min(len(r["accs"]), len(ref["accs"])) > 1 else None
        out[r["optimizer"]] = {"gap_pp": gap, "spread_pp": spread, "inside": None if spread is None else abs(gap) <= spread}
    return out


def _shape(cfg: dict) -> str:
    from .models import lm_preset

    p = lm_preset(cfg["model"], layers=cfg["layers"], width=cfg["width"], heads=cfg["heads"])
    return f"{p.layers} layers, width {p.width}, {p.heads} heads"


def findings(data: dict, rows: list[dict]) -> list[str]:
    """Plain sentences: the task, the pretrained LM, each optimizer against AdamW, and what pretraining gave."""
    t, pre = data["task"], data["pretrain"]
    cfg = pre["config"]
    loss = pre.get("final_val_loss")
    lines = [f"- Task: {t['description']}; {t['train']} training and {t['test']} test examples; always answering the "
             f"most frequent test class scores {100 * t['chance']:.1f} %.",
             f"- Pretrained LM: {cfg['model']} ({_shape(cfg)}), "
             f"{cfg['steps']} steps of {cfg['optimizer']} on {cfg['data']} ({cfg['tokenizer']} tokens, context {cfg['context']})"
             + (f", final validation loss {loss:.3f}" if loss is not None else "") + "; the same weights start every run."]  # fmt: skip
    gaps = compare(rows)
    for r in rows:
        line = f"- **{r['optimizer']}**: test accuracy {_acc(r['mean'], r['std'], len(r['accs']))} over {r['seeds']} seed(s)"
        if r["diverged"]:
            line += f", {r['diverged']} diverged"
        g = gaps.get(r["optimizer"])
        if g is not None:
            where = ("one seed: indicative only" if g["inside"] is None else
                     f"{'inside' if g['inside'] else 'outside'} the seed spread of {g['spread_pp']:.1f} points")  # fmt: skip
            line += f"; {g['gap_pp']:+.1f} points vs AdamW ({where})"
        lines.append(line + ".")
    scratch = next((r for r in rows if not r["pretrained"]), None)
    ref = next((r for r in rows if r["optimizer"] == REFERENCE), None)
    if scratch and ref and scratch["mean"] is not None and ref["mean"] is not None:
        lines.append(f"- Pretraining is worth {100 * (ref['mean'] - scratch['mean']):+.1f} points: AdamW from the pretrained LM "
                     f"{_acc(ref['mean'], ref['std'], len(ref['accs']))} vs from a random initialization "
                     f"{_acc(scratch['mean'], scratch['std'], len(scratch['accs']))}.")  # fmt: skip
    return lines


def table(rows: list[dict]) -> str:
    gaps = compare(rows)
    head = "| optimizer | test accuracy | seeds | vs AdamW (points) | final train loss | state bytes |\n|---|---:|---:|---:|---:|---:|\n"
    lines = []
    for r in rows:
        g = gaps.get(r["optimizer"])
        tl = "" if r["train_loss"] is None else f"{r['train_loss']:.3f}"
        lines.append(f"| {r['optimizer']} | {_acc(r['mean'], r['std'], len(r['accs']))} | {r['seeds']} | "
                     f"{'' if g is None else format(g['gap_pp'], '+.1f')} | {tl} | {r['state_bytes']:,} |")  # fmt: skip
    return head + "\n".join(lines) + "\n"


def plot(rows: list[dict], chance: float, path: Path) -> Path | None:
    """Horizontal bars of mean test accuracy with seed-std error bars, and the chance level."""
    from ..analysis.plots import pyplot

    plt = pyplot()
    rows = [r for r in rows if r["mean"] is not None]
    if plt is None or not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.5))
    ys = list(range(len(rows)))[::-1]
    colors = ["black" if r["optimizer"] == REFERENCE else ("#999999" if not r["pretrained"] else "#0072B2") for r in rows]
    ax.barh(ys, [100 * r["mean"] for r in rows], xerr=[100 * r["std"] for r in rows], color=colors, capsize=3)
    ax.axvline(100 * chance, color="#D55E00", linestyle="--", label=f"chance ({100 * chance:.0f} %)")
    ax.set_yticks(ys)
    ax.set_yticklabels([r["optimizer"] for r in rows], fontsize=8)
    lo = min(100 * chance, min(100 * (r["mean"] - r["std"]) for r in rows))
    hi = max(100 * (r["mean"] + r["std"]) for r in rows)
    ax.set_xlim(max(0, lo - 5), min(100, hi + 10))
    ax.set_xlabel("test accuracy (%), mean ± std over seeds")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def write_report(data: dict, out: Path) -> Path:
    """``finetune.png`` and ``report.md`` in ``out``; returns the report's path."""
    rows = aggregate(data["runs"])
    fig = plot(rows, data["task"]["chance"], out / "finetune.png")
    s = data["settings"]
    text = (f"# Downstream fine-tuning: {data['task']['name']}\n\nCommand: `{data.get('command', 'effopt finetune')}`\n\n"
            f"Fine-tuning: {s['steps']} steps, batch {s['batch_size']}, peak lr {s['lr']:g} (AdamW scale), warm-up "
            f"{s['warmup']}, cosine to {s['min_lr_ratio']:g}x, weight decay {s['weight_decay']:g}, clipping {s['clip']:g}; "
            "a linear head on the mean of the LM's last hidden states.\n\n## Findings\n\n" + "\n".join(findings(data, rows))
            + "\n\n## Results\n\n" + table(rows) + ("\n![finetune](finetune.png)\n" if fig else ""))  # fmt: skip
    path = out / "report.md"
    path.write_text(text)
    return path
