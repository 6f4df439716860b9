"""Protocols as plug-ins: discovered from their folder, found by name or id, run end to end by ``effopt suite``
with their own callbacks, and old folders (named by protocol id) still rebuild (tests/test_bench_harness.py)."""

import json
import pkgutil
from pathlib import Path

import pytest

from efficient_optim.bench import protocols as registry
from efficient_optim.bench.callbacks import Callback
from efficient_optim.bench.config import RunConfig
from efficient_optim.bench.protocols import get_protocol, protocols, register_protocol
from efficient_optim.bench.protocols.base import MET, NOT_MET, Protocol, Verdict
from efficient_optim.bench.report import group_runs
from efficient_optim.bench.runner import plan_matrix
from efficient_optim.cli import main

TINY = ["--data", "{corpus}", "--steps", "3", "--layers", "1", "--width", "32", "--heads", "2", "--context", "16",
        "--batch", "4", "--eval-batches", "1", "--no-progress"]  # fmt: skip


def test_every_file_of_the_folder_is_a_protocol_found_by_name_and_id():
    folder = Path(registry.__file__).parent
    modules = {m.name for m in pkgutil.iter_modules([str(folder)])} - {"base"}
    found = protocols()
    assert len(found) >= len(modules) >= 4  # one protocol per file, none imported by hand
    names = [n for p in found for n in p.names]
    assert len(names) == len(set(names))
    for name, alias in (("baselines", "p1"), ("lowrank-adam", "p7"), ("weight-splitting", "p8")):
        assert get_protocol(name) is get_protocol(alias) is get_protocol(alias.upper())
        assert get_protocol(name).protocol_id.lower() == alias and alias in get_protocol(name).title.lower()
    assert get_protocol("lr-sweep") is not None and get_protocol("nosuch") is None
    assert [p.name for p in found][:4] == ["baselines", "adaptive", "lowrank-adam", "weight-splitting"]  # ids first, in order


def test_suite_list_shows_names_and_their_ids(capsys):
    assert main(["suite", "--list"]) == 0
    out = capsys.readouterr().out
    assert "baselines (p1)" in out and "lowrank-adam (p7)" in out and "lr-sweep" in out


class _Counter(Callback):
    def __init__(self):
        self.steps = 0

    def on_after_optimizer_step(self, ctx, step):
        self.steps += 1

    def on_run_end(self, ctx, result):
        result["counted_steps"] = self.steps


class _TwoOptimizers(Protocol):
    """A protocol defined outside the folder: AdamW against SGD, one verdict, one report section."""

    name = "test-two-optimizers"
    aliases = ("t2",)
    title = "Two optimizers (test)"
    defaults = RunConfig(steps=3, context=16, batch_size=4)

    def plan(self, base, seeds, quick):
        return plan_matrix(base, ["adamw", "sgd"], seeds), []

    def callbacks(self, cfg):
        return [_Counter()]

    def verdicts(self, runs, out, base):
        g = {x.optimizer: x for x in group_runs(runs)}
        gap = g["sgd"].stat("final_val_loss")[0] - g["adamw"].stat("final_val_loss")[0]
        return [Verdict("sgd above adamw", "sgd", f"{gap:+.3f}", MET if gap > 0 else NOT_MET)]

    def sections(self, runs, out, base):
        return ["## Steps seen by the callback\n\n" + ", ".join(str(r["counted_steps"]) for r in runs) + "\n"]


def test_a_protocol_from_elsewhere_runs_end_to_end_with_its_callbacks(corpus, tmp_path, capsys):
    register_protocol(_TwoOptimizers())
    try:
        out = tmp_path / "t2"
        assert main(["suite", "t2", *[a.format(corpus=corpus) for a in TINY], "--out", str(out)]) == 0
        suite = json.loads((out / "suite.json").read_text())
        assert suite["suite"] == "test-two-optimizers" and suite["verdicts"][0]["criterion"] == "sgd above adamw"
        report = (out / "report.md").read_text()
        assert "## Verdicts: Two optimizers (test)" in report and "## Steps seen by the callback\n\n3, 3" in report
        with pytest.raises(ValueError, match="already belongs"):
            register_protocol(type("Clash", (_TwoOptimizers,), {"name": "other", "aliases": ("p1",)})())
    finally:
        registry._REGISTRY.pop("test-two-optimizers", None)
        registry._ALIASES.pop("t2", None)
