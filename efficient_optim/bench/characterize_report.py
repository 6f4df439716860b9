"""The report of ``effopt characterize``: numbers, plain-sentence answers, figures.

Everything is recomputed from the files of the study folder (``study.json``, ``study_base.json``,
``plan.json``, each run's ``result.json``, ``metrics.jsonl``, ``probes.jsonl`` and ``probe_overhead.json``),
so ``effopt characterize --report-only --out DIR`` rebuilds it from a finished, interrupted or copied folder.
Writes ``report.md``, ``characterization.json`` and ``fig_*.png``.

This module loads the folder (``load_study``) and renders; the analyses are ``analysis.characterization``, the
sentences ``characterize_sentences`` and the figures ``characterize_figures``.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from ..analysis.characterization import ERR_MIN_STEP, QUANT_MIN_NUMEL, StudyData, analyze
from ..analysis.probe import read_probes
from .characterize_figures import figures
from .characterize_sentences import pct, sentences
from .metrics import MetricsLog, write_json_atomic
from .runner import collect_summary, load_plan


# ------------------------------------------------------------------------------------------ loading
def load_entries(out: Path) -> dict[str, dict]:
    """Configuration key -> entry, from ``study.json``."""
    return {e["key"]: e for e in json.loads((out / "study.json").read_text())["entries"]}


def load_rows(out: Path) -> dict[str, list[dict]]:
    """Entry key -> result rows of its finished runs (by seed)."""
    rows: dict[str, list[dict]] = {}
    for c in load_plan(out):
        f = out / c.run_id / "result.json"
        if f.is_file():
            rows.setdefault(c.settings, []).append(json.loads(f.read_text()))
    for v in rows.values():
        v.sort(key=lambda r: r["seed"])
    return rows


def run_dirs(out: Path) -> dict[str, list[Path]]:
    """Entry key -> its runs' folders, by seed."""
    dirs: dict[str, list[Path]] = {}
    for c in sorted(load_plan(out), key=lambda c: c.seed):
        dirs.setdefault(c.settings, []).append(out / c.run_id)
    return dirs


def load_study(out: Path) -> StudyData:
    """The study folder's data as the analyses take it (``analysis.characterization.StudyData``)."""
    dirs = run_dirs(out)
    base = json.loads((out / "study_base.json").read_text()) if (out / "study_base.json").is_file() else {}
    records = {k: read_probes(d[0] / "probes.jsonl") for k, d in dirs.items() if d}
    overhead = {}
    for k, d in dirs.items():
        f = d[0] / "probe_overhead.json"
        if f.is_file():
            overhead[k] = json.loads(f.read_text())["probe_overhead_s"]
    return StudyData(load_entries(out), load_rows(out), records, overhead, base)


def loss_curves(out: Path) -> dict[str, tuple[list[int], list[float]]]:
    """Entry key -> (steps, training losses) of its first seed's run, from ``metrics.jsonl``."""
    curves = {}
    for key, d in run_dirs(out).items():
        recs = MetricsLog(d[0] / "metrics.jsonl").read()
        pts = [(r["step"], r["train_loss"]) for r in recs if r.get("kind") == "train"]
        curves[key] = ([p[0] for p in pts], [p[1] for p in pts])
    return curves


# ------------------------------------------------------------------------------------------- report
def _table(a: dict) -> list[str]:
    lines = ["| configuration | stage | runs | diverged (step) | final val loss | gap vs fp32 | state B/param | m rel. err | v rel. err | spec |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in a["configs"]:
        if c["stage"] == "sensitivity":
            continue
        val = "—" if c["final_val_loss"] is None else f"{c['final_val_loss']:.4f}" + (f" ± {c['final_val_loss_std']:.4f}" if c["final_val_loss_std"] else "")
        div = f"{c['diverged']}/{c['runs']}" + (f" ({', '.join(map(str, c['diverged_at_steps']))})" if c["diverged"] else "")
        m = c["errors"].get("m", {}).get("mean_rel")
        v = c["errors"].get("v", {}).get("mean_rel")
        if c["diverged"] == c["runs"]:
            m = c["errors"].get("m", {}).get("first_rel")
            v = c["errors"].get("v", {}).get("first_rel")
        bpp = c["state_bytes_per_param"]
        lines.append(f"| {c['label']} | {c['stage']} | {c['runs']} | {div} | {val} | {pct(c['gap_pct'])} | "
                     f"{'n/a' if bpp is None else f'{bpp:.3f}'} | {'n/a' if m is None else f'{m:.3f}'} | "
                     f"{'n/a' if v is None else f'{v:.3f}'} | `{c['spec']}` |")  # fmt: skip
    return lines


def _figures_fresh(out: Path) -> list[Path] | None:
    """The existing figures if they are newer than every input file, else None."""
    figs = sorted(out.glob("fig_*.png"))
    if not figs:
        return None
    inputs = [p for pat in ("*/*/seed*/result.json", "*/*/seed*/probes.jsonl", "p5_synthetic.json", "study.json")
              for p in out.glob(pat)]  # fmt: skip
    newest = max((p.stat().st_mtime for p in inputs), default=0.0)
    return figs if min(p.stat().st_mtime for p in figs) >= newest else None




def _setting_line(a: dict) -> list[str]:
    st = a.get("setting") or {}
    if not st:
        return []
    return [f"Model `{st.get('model')}` ({st.get('layers') or 'preset'} layers, width {st.get('width') or 'preset'}), data "
            f"`{st.get('data')}`, context {st.get('context')}, batch {st.get('batch_size')}, {st.get('steps')} steps, peak lr "
            f"{st.get('lr')}, warm-up + cosine, clipping {st.get('clip')}. A run diverges when its training loss exceeds "
            "twice the first step's. Errors are measured against an exact fp32 shadow of each state updated from the "
            f"same gradients (mean over the matrices of >= {QUANT_MIN_NUMEL} elements, steps >= {ERR_MIN_STEP}; for runs "
            "that diverged, at the first step). "
            + ("**Quick mode: a smoke test, not results.**" if a.get("quick") else ""), ""]  # fmt: skip


def _markdown(a: dict, S: dict, figs: list[Path]) -> list[str]:
    lines = ["# Characterization: why low-bit optimizer states fail, and what fixes them", ""]
    if a.get("command"):
        lines += ["Command:", "", f"    {a['command']}", ""]
    lines += _setting_line(a)
    for q, ls in S.items():
        lines += [f"## {q}", ""] + [x if x.startswith("  -") else f"- {x}" for x in ls] + [""]
    lines += ["## All configurations", ""] + _table(a) + [""]
    ov = [c["probe_overhead_frac"] for c in a["configs"] if c["probe_overhead_frac"] is not None]
    if ov:
        lines += [f"Probe overhead (shadow states every step, statistics at probe steps, sharpness where on): median "
                  f"{100 * statistics.median(ov):.1f} % of the run's time, max {100 * max(ov):.1f} %.", ""]  # fmt: skip
    if a["errors"]:
        lines += ["## Failed runs", ""] + [f"- `{e['run']}`: {e['error']}" for e in a["errors"]] + [""]
    if a["pending"]:
        lines += ["## Not run yet", "", "Resume with `--resume`: " + ", ".join(f"`{p}`" for p in a["pending"]), ""]
    lines += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figs] + [""]
    return lines


def write_report(out: Path, redraw: bool = True) -> Path:
    """Write ``report.md``, ``characterization.json`` and the figures; returns the report's path.

    Args:
        out: the study folder.
        redraw: draw the figures again (default True); False keeps the existing ones when no input changed
            since they were drawn.
    """
    out = Path(out)
    study = load_study(out)
    a = analyze(study)
    if (out / "p5_synthetic.json").is_file():
        a["p5_synthetic"] = json.loads((out / "p5_synthetic.json").read_text())
    S = sentences(a)
    figs = None if redraw else _figures_fresh(out)
    if figs is None:
        figs = figures(out, a, study.records, loss_curves(out))
    a["sentences"] = S
    a["figures"] = [p.name for p in figs]
    summary = collect_summary(out, load_plan(out))
    a["errors"] = summary["errors"]
    a["pending"] = summary["pending"]
    write_json_atomic(out / "characterization.json", a)
    path = out / "report.md"
    path.write_text("\n".join(_markdown(a, S, figs)) + "\n")
    return path
