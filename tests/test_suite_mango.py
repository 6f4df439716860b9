"""``effopt suite mango --quick`` (alias p9) end to end on tiny models, and the phase sentences of a controller's
decisions."""

from __future__ import annotations

import json

import pytest
import torch

from efficient_optim import cli
from efficient_optim.bench.mango_analysis import mean_bits, phase_sentences, phases
from efficient_optim.bench.protocols.mango import METHODS


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _line(step, grad, momentum, lr, loss):
    names = ("transformer.wte.weight", "transformer.h.0.mlp.c_fc.weight")
    bits = {"fp32": 32.0, "q8": 8.25, "q2": 2.25}
    return {"kind": "controller", "step": step + 1, "decision_step": step, "lr": lr, "train_loss": loss,
            "grad": dict.fromkeys(names, grad), "momentum": dict.fromkeys(names, momentum),
            "grad_bits": dict.fromkeys(names, bits[grad]), "momentum_bits": dict.fromkeys(names, {"fp32": 32.0, "4bit": 4.0}[momentum]),
            "numel": dict(zip(names, (300, 100)))}  # fmt: skip


def test_phases_follow_the_decisions_and_the_schedule():
    lines = [_line(0, "fp32", "fp32", 1e-3, 5.0), _line(10, "fp32", "fp32", 3e-3, 4.0), _line(20, "q2", "4bit", 3e-3, 3.5),
             _line(30, "q2", "4bit", 2e-3, 3.2), _line(40, "q8", "4bit", 1e-3, 3.0)]  # fmt: skip
    trains = [{"kind": "train", "step": s, "lr": lr, "train_loss": loss} for s, lr, loss in ((10, 3e-3, 4.1), (50, 5e-4, 2.9))]
    assert mean_bits(lines[0], lines[0]["numel"], "grad_bits") == 32.0
    found = phases(lines, trains, total_steps=50)
    assert [(p["start"], p["end"]) for p in found] == [(0, 20), (20, 40), (40, 50)]
    text = phase_sentences(lines, trains, total_steps=50)
    assert text[0].startswith("steps 0-20: gradients 32.0 bits on average (embedding fp32, MLP fp32), momentum 32.0 bits")
    assert "rises 1.0e-03 -> 3.0e-03 (warm-up)" in text[0] and "training loss 5.00 -> 3.50" in text[0]
    assert "gradients 2.2 bits" in text[1] and "decays 3.0e-03" in text[1]
    assert "gradients 8.2 bits on average (embedding q8, MLP q8), momentum 4.0 bits" in text[2]


def test_mango_suite_quick_end_to_end(corpus, tmp_path, capsys, one_thread):
    out = tmp_path / "p9"
    rc = cli.main(["suite", "p9", "--quick", "--data", str(corpus), "--width", "32", "--heads", "2", "--context", "16",
                   "--layers", "1", "--steps", "8", "--eval-every", "0", "--eval-batches", "2", "--no-progress",
                   "--out", str(out)])  # fmt: skip
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    suite = json.loads((out / "suite.json").read_text())
    assert suite["suite"] == "mango" and suite["quick"]
    verdicts = suite["verdicts"]
    criteria = " ".join(v["criterion"] for v in verdicts)
    for words in ("training-memory reduction vs fp32 Adam", "budget violations", "controller overhead",
                  "interpretable phases", "learned policy beats the planner and the rules"):
        assert words in criteria, words
    assert all(v["verdict"] in ("indicative", "measured", "not measurable here") for v in verdicts)
    violations = next(v for v in verdicts if v["criterion"].startswith("budget violations"))
    assert violations["measured"].startswith("0 of") and "points to 'met'" in violations["reason"]
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["errors"]
    ran = {r["settings"].split("/")[1] for r in summary["runs"]}
    skipped = " ".join(v["criterion"] for v in suite["missing"])
    for m in METHODS:  # every method ran, or is reported as skipped with its reason: never dropped silently
        assert m.name in ran or f"{m.words}: skipped" in skipped, m.name
    controlled = [r for r in summary["runs"] if r.get("controller_kind")]
    assert controlled and all(r["budget_violations"] == 0 and r["decision_bytes_max"] <= r["budget_bytes"] for r in controlled)
    budgets = {}
    for r in controlled:
        budgets.setdefault(r["settings"].split("/")[0], set()).add(r["budget_bytes"])
    assert set(budgets) >= {"lm", "cnn"} and all(len(b) == 1 for b in budgets.values())  # one budget per model
    report = (out / "report.md").read_text()
    assert "### Results: LM" in report and "### Results: CNN" in report and "**One seed**" in report
    assert "### Phases: LM" in report and list(out.glob("phases_*.png"))


@pytest.mark.timeout(300)
def test_planning_the_suite_keeps_third_party_import_chatter_out_of_the_output(tmp_path):
    """The mango protocol builds a model while planning (its budget is measured on one): what transformers and
    the optional baselines print at import must go to third_party.log, not the terminal (a fresh process, so
    nothing is imported yet)."""
    import subprocess
    import sys

    code = ("import sys; from efficient_optim.bench import suites; from efficient_optim.third_party import ChatterLog, "
            "chatter_to\nargv = ['mango', '--quick', '--out', sys.argv[1]]\nap, suite = suites._parser(argv)\n"
            "with chatter_to(ChatterLog()) as log:\n    suites._plan(suite, ap.parse_args(argv), argv)\n"
            "    log.keep_in(sys.argv[1] + '/third_party.log')\nprint('planned')")  # fmt: skip
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "planned" and run.stderr.strip() == "", run.stdout[-1000:] + run.stderr[-1000:]
