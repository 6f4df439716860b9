"""Reports that do not mislead: seed caveats, spread, load flags, steps to target, quick verdicts, plot styles."""

import json

import pytest

from efficient_optim.analysis.plots import line_styles
from efficient_optim.bench.config import RunConfig
from efficient_optim.bench.protocols.base import INDICATIVE, MET, NOT_MET, Verdict, indicative
from efficient_optim.bench.protocols.baselines import Baselines
from efficient_optim.bench.report import build_report, group_runs, markdown_table, seed_spread, terminal_table


def _row(spec: str, seed: int, val: float, *, loaded: bool = False, step_ms: float = 20.0) -> dict:
    cfg = RunConfig(optimizer=spec, seed=seed, steps=50)
    return {"run_id": cfg.run_id, "optimizer": spec, "seed": seed, "settings": "default", "model": "gpt2-tiny",
            "data": "embedded", "target_steps": 50, "device": "cpu", "torch": "x", "peak_memory_kind": "params+grads+states",
            "diverged": False, "final_val_loss": val, "val_ppl": 2.718281828**val, "final_train_loss": val,
            "state_bytes": 8000 if spec == "adamw" else 2200, "num_params": 1000,
            "state_bytes_per_param": 8.0 if spec == "adamw" else 2.2, "peak_memory_bytes": 20000,
            "step_time_ms": step_ms, "step_time_q1_ms": step_ms - 1, "step_time_q3_ms": step_ms + 2,
            "optimizer_step_time_ms": 1.0, "tokens_per_s": 100.0, "steps_to_target": None, "target_ppl": None,
            "load_avg_start": 9.0 if loaded else 0.5, "load_avg_end": 0.7, "cpu_cores": 2, "torch_threads": 2,
            "cpu_per_wall": 1.0, "timing_loaded": loaded}  # fmt: skip


def fake_folder(tmp_path, losses: dict[str, list[float]], loaded: tuple[str, ...] = (), evals=None):
    """A run folder as the runner writes it: plan.json, result.json and metrics.jsonl per run.

    ``losses``: spec -> final val loss per seed; ``evals``: spec -> [(step, val_ppl)] logged by every seed.
    """
    plan, rows = [], []
    for spec, vals in losses.items():
        for seed, val in enumerate(vals):
            row = _row(spec, seed, val, loaded=spec in loaded)
            plan.append(RunConfig(optimizer=spec, seed=seed, steps=50).to_dict())
            run = tmp_path / row["run_id"]
            run.mkdir(parents=True)
            (run / "result.json").write_text(json.dumps(row))
            recs = [{"kind": "train", "step": s, "train_loss": val + 1 - s / 50} for s in (10, 20, 30, 40, 50)]
            recs += [{"kind": "eval", "step": s, "val_loss": 0.0, "val_ppl": p} for s, p in (evals or {}).get(spec, [])]
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
            rows.append(row)
    (tmp_path / "plan.json").write_text(json.dumps({"runs": plan}))
    return rows


def test_a_one_seed_report_shows_no_std_and_says_the_spread_is_unknown(tmp_path):
    rows = fake_folder(tmp_path, {"adamw": [3.0], "qadamw8": [2.9]})
    report = build_report(tmp_path).read_text()
    assert "±" not in report and "0.0000" not in report
    assert "hint, not a finding" in report and "unknown (1 seed)" in report
    table = terminal_table(rows)
    assert "+-" not in table and "hint, not a finding" in table and "unknown (1 seed)" in table


def test_two_seeds_show_the_std_and_whether_a_gap_is_within_the_seed_spread(tmp_path):
    rows = fake_folder(tmp_path, {"adamw": [3.0, 3.1], "qadamw8": [3.02, 3.12], "qadamw4": [2.5, 2.51]})
    report = build_report(tmp_path).read_text()
    assert "| adamw | 2/2 | 3.0500 ± 0.0707 |" in report
    assert "hint, not a finding" not in report
    groups = {g.optimizer: g for g in group_runs(rows)}
    assert seed_spread(groups["qadamw8"], groups["adamw"]) == "within"
    assert seed_spread(groups["qadamw4"], groups["adamw"]) == "beyond"
    assert seed_spread(groups["adamw"], groups["adamw"]) == "baseline"
    table = terminal_table(rows)
    assert "3.0500 +- 0.0707" in table and "within" in table and "beyond" in table


def test_mixed_seed_counts_name_the_one_seed_rows(tmp_path):
    rows = fake_folder(tmp_path, {"adamw": [3.0, 3.1], "qadamw8": [3.0]})
    table = terminal_table(rows)
    assert "qadamw8 finished with one seed" in table and "unknown (1 seed)" in table


def test_timing_measured_under_load_is_flagged(tmp_path):
    rows = fake_folder(tmp_path, {"adamw": [3.0], "qadamw8": [2.9]}, loaded=("qadamw8",))
    report = build_report(tmp_path).read_text()
    assert "20.0*" in report and "Timing not comparable: runs of qadamw8" in report
    assert "0.50–9.00 on 2 cores" in report
    assert "19.0–22.0" in report  # the step-time interquartile range
    assert "20.0*" in terminal_table(rows)
    idle = [dict(r, timing_loaded=False) for r in rows]
    assert "not comparable" not in terminal_table(idle) and "*" not in terminal_table(idle).split("note:")[0]


def test_steps_to_target_in_the_table_agree_with_the_baselines_verdicts(tmp_path):
    evals = {"adamw": [(25, 30.0), (50, 20.0)], "qadamw8": [(25, 20.5), (50, 19.0)], "sgd": [(25, 40.0), (50, 35.0)]}
    losses = {"adamw": [3.0], "qadamw8": [2.9], "sgd": [3.5]}
    rows = fake_folder(tmp_path, losses, evals=evals)
    for r in rows:  # the final evaluation: target = 1.05 x adamw's final ppl
        r["val_ppl"] = evals[r["optimizer"]][-1][1]
        (tmp_path / r["run_id"] / "result.json").write_text(json.dumps(r))
    suite = Baselines()
    verdicts = {v.subject: v.measured for v in suite.verdicts(rows, tmp_path, RunConfig(steps=50)) if v.criterion.startswith("steps to")}
    assert verdicts == {"adamw": "50", "qadamw8": "25", "sgd": "never"}
    table = markdown_table(rows, tmp_path, suite.table_target(rows))
    assert "steps to val ppl ≤ 21.000" in table
    cells = {line.split(" | ")[0].strip("| "): line.rstrip(" |").split(" | ")[-1] for line in table.splitlines()[2:]}
    assert cells == verdicts
    assert "steps to" not in markdown_table(rows)  # no target, no column (no more "n/a" beside verdicts)


def test_baselines_labels_name_the_baseline_they_are_computed_against(tmp_path):
    rows = fake_folder(tmp_path, {"adam": [3.0], "qadamw8": [2.9]})
    crits = {v.criterion for v in Baselines().verdicts(rows, tmp_path, RunConfig(steps=50))}
    assert "optimizer memory >= 2x below adam" in crits and "wall-clock <= 1.2x adam" in crits
    rows = fake_folder(tmp_path / "w", {"adamw": [3.0], "qadamw8": [2.9]}, loaded=("qadamw8",))
    vs = {v.criterion: v for v in Baselines().verdicts(rows, tmp_path / "w", RunConfig(steps=50))}
    assert "wall-clock <= 1.2x adamw" in vs and "not comparable" in vs["wall-clock <= 1.2x adamw"].reason
    assert vs["< 2% perplexity degradation vs adamw"].verdict == INDICATIVE  # one seed: a hint


def test_quick_verdicts_are_indicative_with_their_direction():
    vs = [Verdict("a", "x", "1", MET), Verdict("b", "x", "2", NOT_MET, "why"), Verdict("c", "x", "3", "measured")]
    out = indicative(vs, RunConfig(steps=60), 1)
    assert [v.verdict for v in out] == [INDICATIVE, INDICATIVE, "measured"]
    assert "points to 'met'" in out[0].reason and "60 steps, 1 seed(s)" in out[0].reason
    assert "points to 'not met'" in out[1].reason and out[1].reason.endswith("why")


def test_every_optimizer_line_has_its_own_style_and_adamw_is_on_top(tmp_path):
    fake_folder(tmp_path, {n: [3.0, 3.1] if n == "adamw" else [3.0] for n in
                           ("sgd", "adam", "adamw", "lion", "qadamw8", "qadamw4", "hybrid_adam", "adafactor", "x9")})  # fmt: skip
    from efficient_optim.analysis.plots import pyplot
    from efficient_optim.bench.report import group_runs as gr
    from efficient_optim.bench.report_plots import draw_loss_curves
    from efficient_optim.bench.runner import collect_summary

    plt = pyplot()
    if plt is None:
        pytest.skip("matplotlib is not installed")
    fig = draw_loss_curves(tmp_path, gr(collect_summary(tmp_path)["runs"]), plt)
    lines = fig.axes[0].get_lines()
    assert len(lines) == 9
    looks = [(line.get_color(), line.get_linestyle(), line.get_marker()) for line in lines]
    assert len(set(looks)) == 9
    by_label = {line.get_label(): line for line in lines}
    assert "adamw (mean of 2 seeds)" in by_label and "sgd" in by_label  # "mean" only where there are seeds to average
    assert by_label["adamw (mean of 2 seeds)"].get_zorder() > max(line.get_zorder() for line in lines if line.get_label() != "adamw (mean of 2 seeds)")
    assert "mean over the seeds in the legend" in fig._suptitle.get_text()
    plt.close(fig)


def test_line_styles_differ_pairwise_in_colour_and_dash_for_the_first_four():
    labels = [f"o{i}" for i in range(12)]
    styles = line_styles(labels, baseline="o0")
    assert styles["o0"]["color"] == "black" and styles["o0"]["zorder"] > styles["o1"]["zorder"]
    looks = [(s["color"], s["linestyle"], s["marker"]) for s in styles.values()]
    assert len(set(looks)) == 12
    first = [styles[f"o{i}"] for i in range(1, 5)]
    assert len({s["color"] for s in first}) == 4 and len({s["linestyle"] for s in first}) == 4


def test_evaluation_defaults_to_five_times_per_run():
    assert RunConfig(steps=250).eval_interval == 50
    assert RunConfig(steps=3).eval_interval == 1
    assert RunConfig(steps=250, eval_every=0).eval_interval == 0
    with pytest.raises(ValueError, match="eval_every"):
        RunConfig(eval_every=-1).validate()
