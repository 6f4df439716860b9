"""The outputs of the error decomposition (``analysis.decomposition``): ``decomposition.json``, the figure
``decomposition.png`` (with matplotlib) and the report ``decomposition.md``."""

from __future__ import annotations

import math
from pathlib import Path

from .decomposition_measures import MODELS, SOURCES, format_number
from .decomposition_variants import DEFAULT_SPEC


def write_outputs(result: dict, out, command: str | None = None) -> dict[str, Path]:
    """Write ``decomposition.json``, ``decomposition.png`` (if matplotlib is there) and ``decomposition.md``
    into folder ``out`` (created); returns kind -> path of what was written."""
    from ..files import write_json_atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if command is not None:
        result = {**result, "command": command}
    paths = {"json": out / "decomposition.json"}
    write_json_atomic(paths["json"], result)
    png = plot_decomposition(result, out / "decomposition.png")
    if png is not None:
        paths["png"] = png
    paths["md"] = out / "decomposition.md"
    paths["md"].write_text(decomposition_markdown(result, png.name if png else None))
    return paths


def plot_decomposition(result: dict, path) -> Path | None:
    """Errors over steps (quant, factor, both, and the three predictions), cosines over steps, and a
    per-layer bar chart of the time-mean errors. ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = result["steps"]
    fig = plt.figure(figsize=(12, 8.5))
    ax1, ax2, ax3 = fig.add_subplot(2, 2, 1), fig.add_subplot(2, 2, 2), fig.add_subplot(2, 1, 2)
    xs = [r["step"] for r in rows]
    colors = {"quant": "tab:blue", "factor": "tab:orange", "both": "tab:red"}
    for x in SOURCES:
        ys = [r[f"err_{x}"] for r in rows]
        if any(y is not None for y in ys):
            ax1.plot(
                xs, [math.nan if y is None else y for y in ys], color=colors[x], lw=2, label=f"{x} (measured)"
            )
            ax2.plot(
                xs,
                [math.nan if r[f"cos_{x}"] is None else r[f"cos_{x}"] for r in rows],
                color=colors[x],
                label=x,
            )
    styles = {
        "linear": ("--", "tab:green"),
        "independent": (":", "tab:purple"),
        "multiplicative": ("-.", "tab:brown"),
    }
    for m in MODELS:
        ys = [r[f"pred_{m}"] for r in rows]
        if any(y is not None for y in ys):
            ax1.plot(xs, [math.nan if y is None else y for y in ys], ls=styles[m][0], color=styles[m][1],
                     label=f"{m} prediction")  # fmt: skip
    ax1.set_xlabel("step")
    ax1.set_ylabel(
        f"||d_x - d|| / ||d||  (numel-weighted, {result['summary']['aggregated_over']})", fontsize=8
    )
    ax1.set_title(f"update-direction error; verdict: {result['summary']['verdict']}", fontsize=10)
    ax1.legend(fontsize=7)
    ax1.grid(alpha=0.3)
    ax2.set_xlabel("step")
    ax2.set_ylabel("cos(d_x, d)")
    ax2.set_title("cosine similarity with the dense AdamW direction", fontsize=10)
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3)
    per = [(n, e) for n, e in result["per_layer"].items() if e["aggregated"]]
    if per:
        width = 0.27
        idx = range(len(per))
        for k, x in enumerate(SOURCES):
            ax3.bar([i + (k - 1) * width for i in idx], [e[f"mean_err_{x}"] or 0.0 for _, e in per], width,
                    color=colors[x], label=x)  # fmt: skip
        ax3.set_xticks(list(idx))
        ax3.set_xticklabels([_short(n) for n, _ in per], rotation=45, ha="right", fontsize=7)
        ax3.legend(fontsize=7)
    ax3.set_ylabel("mean relative error over steps")
    ax3.set_title(f"per layer ({result['summary']['aggregated_over']})", fontsize=10)
    ax3.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _short(name: str) -> str:
    return name.replace("transformer.", "").replace(".weight", "")


def decomposition_markdown(result: dict, png: str | None = "decomposition.png") -> str:
    """A short report: settings, headline numbers, model fit, verdict, per-layer table."""
    s, st = result["summary"], result["settings"]
    lines = ["# Protocol P3: error decomposition of the update direction", ""]
    if result.get("command"):
        lines += ["```", result["command"], "```", ""]
    both = result["variants"]["both"]
    lines += [f"Configuration: m_codec={both.get('m_codec')}, v_codec={both.get('v_codec')} "
              f"(spec `{st.get('spec') or DEFAULT_SPEC}`); trajectory: {st['trajectory']}; {st['steps']} steps, "
              f"measured every {st['every']} ({s['measured_steps']} measurements); model {st.get('model')}, "
              f"{s['compressed_layers']} of {s['layers']} parameters compressed ({s['compressed_numel']} elements); "
              f"{st.get('seconds')} s.", ""]  # fmt: skip
    lines += ["| | quant alone | factor alone | both |", "|---|---|---|---|"]
    for label, key in (("mean rel. error", "mean_err"), ("last rel. error", "last_err"), ("mean cosine", "mean_cos"),
                       ("mean global rel. error", "mean_global_err")):  # fmt: skip
        lines.append(f"| {label} | " + " | ".join(format_number(s.get(f"{key}_{x}")) for x in SOURCES) + " |")
    lines += ["", f"Predictions of err_both (time mean): linear {format_number(s.get('mean_pred_linear'))}, independent "
              f"{format_number(s.get('mean_pred_independent'))}, multiplicative {format_number(s.get('mean_pred_multiplicative'))}; "
              f"interaction err_both - (e_q + e_f) = {format_number(s.get('mean_interaction'))}.", ""]  # fmt: skip
    if s.get("fit"):
        lines += ["| model | median measured / predicted | mean abs log ratio |", "|---|---|---|"]
        for m in MODELS:
            f = s["fit"][m]
            mark = " (best)" if m == s["best_model"] else ""
            lines.append(f"| {m}{mark} | {f['median_ratio']:.3f} | {f['mean_abs_log_ratio']:.3f} |")
        lines.append("")
    lines += [f"**Verdict: {s['verdict']}.** {s['verdict_text']}", ""]
    if png:
        lines += [f"![decomposition]({png})", ""]
    lines += ["| layer | m | v | quant | factor | both | coupling |", "|---|---|---|---|---|---|---|"]
    for name, e in result["per_layer"].items():
        if e["aggregated"]:
            lines.append(f"| {_short(name)} | {e['m']} | {e['v']} | {format_number(e['mean_err_quant'])} | "
                         f"{format_number(e['mean_err_factor'])} | {format_number(e['mean_err_both'])} | {format_number(e['mean_coupling'])} |")  # fmt: skip
    lines += ["", 'Method and format: docs/hybrid_adam.md, "Where the error comes from: protocol P3".', ""]
    return "\n".join(lines)
