"""``effopt suite lr-sweep``: the grid, the curve summaries (best lr, basin, divergence), and a quick end-to-end run."""

import json

import pytest

from efficient_optim.bench.lr_sweep_analysis import Point, compare, summarize_curve
from efficient_optim.bench.options import UsageError
from efficient_optim.bench.protocols.lr_sweep import lr_grid
from efficient_optim.cli import main

TINY = ["--layers", "1", "--width", "32", "--heads", "2", "--context", "16", "--batch", "4", "--eval-batches", "2",
        "--device", "cpu", "--no-progress"]  # fmt: skip


def test_the_grid_is_log_spaced_and_includes_both_ends():
    assert lr_grid(1e-4, 1e-2, 5) == [1e-4, 3.16e-4, 1e-3, 3.16e-3, 1e-2]
    assert lr_grid(3e-3, 3e-3, 1) == [3e-3]
    with pytest.raises(UsageError, match="lr grid"):
        lr_grid(1e-2, 1e-4, 3)


def _pts(means, diverged=()):
    lrs = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
    return [Point(lr, [] if i in diverged else [m], int(i in diverged)) for i, (lr, m) in enumerate(zip(lrs, means))]


def test_best_lr_basin_and_divergence_boundaries():
    s = summarize_curve(_pts([3.0, 2.5, 2.41, 2.40, 0], diverged={4}))
    assert s["best_lr"] == 3e-3 and s["best_loss"] == 2.40 and s["best_std"] is None
    assert (s["basin_lo"], s["basin_hi"]) == (1e-3, 3e-3)  # 2.41 <= 1.01 * 2.40; 2.5 is not
    assert s["basin_decades"] == pytest.approx(0.477, abs=1e-3)
    assert not s["basin_open_low"] and not s["basin_open_high"]
    assert s["diverges_above"] == 1e-2 and s["diverges_below"] is None
    assert s["diverged"] == [[1e-2, 1, 1]]


def test_a_basin_at_the_grid_edge_is_open_and_a_lone_best_has_zero_width():
    edge = summarize_curve(_pts([2.40, 2.41, 2.6, 2.9, 3.5]))
    assert edge["best_lr"] == 1e-4 and edge["basin_open_low"] and edge["basin_hi"] == 3e-4
    lone = summarize_curve(_pts([3.0, 2.8, 2.4, 2.8, 3.0]))
    assert lone["basin_lo"] == lone["basin_hi"] == 1e-3 and lone["basin_decades"] == 0


def test_an_lr_with_any_diverged_seed_is_never_best_and_a_fully_diverged_curve_has_no_best():
    p = Point(1e-3, [2.0], diverged=1)  # one seed finished with the lowest loss, another diverged
    s = summarize_curve([Point(3e-4, [2.5]), p])
    assert s["best_lr"] == 3e-4 and s["diverges_above"] == 1e-3
    assert summarize_curve([Point(1e-3, [], 2)])["best_lr"] is None


def test_comparisons_at_own_best_at_adamws_best_and_at_the_shared_lr():
    curves = {("adamw", 10): [Point(1e-3, [2.30, 2.32]), Point(3e-3, [2.40, 2.44])],
              ("q8", 10): [Point(1e-3, [2.36, 2.36]), Point(3e-3, [2.31, 2.33])]}  # fmt: skip
    (r,) = compare(curves, {k: summarize_curve(v) for k, v in curves.items()}, shared_lr=2.9e-3)
    assert (r["best_lr"], r["reference_best_lr"], r["shared_lr"]) == (3e-3, 1e-3, 3e-3)
    assert r["own_best_gap"] == pytest.approx(2.32 / 2.31 - 1)  # best vs best
    assert r["at_reference_best_gap"] == pytest.approx(2.36 / 2.31 - 1)
    assert r["shared_gap"] == pytest.approx(2.32 / 2.42 - 1)
    assert r["shared_gap_spread"] == pytest.approx((0.01414**2 + 0.02828**2) ** 0.5 / 2.42, rel=1e-3)


def test_quick_sweep_end_to_end_resume_and_report_rebuild(corpus, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["suite", "lr-sweep", "--quick", "--data", str(corpus), "--steps", "6", "--out", str(out), *TINY]
    assert main(argv) == 0
    data = json.loads((out / "lr_sweep.json").read_text())
    assert [(c["optimizer"], len(c["points"])) for c in data["curves"]] == [("adamw", 3), ("adafactor", 3)]
    assert [p["lr"] for p in data["curves"][0]["points"]] == [1e-3, 3e-3, 9e-3]  # --lr / 3, --lr, --lr x 3
    assert {c["warmup"] for c in data["curves"]} == {1}  # the main job's 75-step warm-up would outlast 6 steps
    (cmp,) = data["comparisons"]
    assert cmp["optimizer"] == "adafactor" and cmp["shared_lr"] == 3e-3
    for key in ("own_best_gap", "shared_gap", "at_reference_best_gap"):
        assert cmp[key] is None or isinstance(cmp[key], float)
    assert all(c["best_lr"] is not None and c["basin_decades"] is not None for c in data["curves"])
    assert all(p["spikes"] and p["spikes"][0] >= 1.0 for c in data["curves"] for p in c["points"])
    report = (out / "report.md").read_text()
    assert "## Findings" in report and "hint, not a finding" in report and "as good as AdamW" in report
    assert "lr_sweep.png" in report and (out / "lr_sweep.png").is_file()
    verdicts = json.loads((out / "suite.json").read_text())["verdicts"]
    assert any(v["criterion"].startswith("basin within 1%") for v in verdicts)
    assert any(v["criterion"].startswith("test loss at the best lr") for v in verdicts)
    assert all(c["best_test_loss"] > 0 for c in data["curves"] if c["best_lr"] is not None)

    assert main(argv) == 2  # a reused folder without --resume is refused
    before = json.loads((out / "summary.json").read_text())["runs"]
    assert main([*argv, "--resume"]) == 0  # nothing left to run: the same rows
    assert json.loads((out / "summary.json").read_text())["runs"] == before
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0 and "## Findings" in (out / "report.md").read_text()


def test_bad_sweep_options_exit_2_before_any_run(corpus, tmp_path, capsys):
    base = ["suite", "lr-sweep", "--quick", "--data", str(corpus), *TINY]
    assert main([*base, "--lrs", "1e-3,abc", "--out", str(tmp_path / "a")]) == 2
    assert main([*base, "--optimizers", "adamw,nosuch", "--out", str(tmp_path / "b")]) == 2
    assert main([*base, "--warmups", "0", "--out", str(tmp_path / "c")]) == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
