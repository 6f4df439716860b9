"""Adaptive precision through the harness: budget settings in optimizer specs, the plan logged in metrics.jsonl
(and resumed exactly after an interruption), its heat map and report section, and ``effopt suite adaptive --quick``
end to end."""

from __future__ import annotations

import json

import pytest
import torch

from efficient_optim import cli
from efficient_optim.bench.config import RunConfig
from efficient_optim.bench.plan_log import PlanLogCallback
from efficient_optim.bench.plan_report import (
    block_index,
    draw_plan_heatmap,
    layer_kind,
    plan_records,
    plan_section,
)
from efficient_optim.bench.train import train_run
from efficient_optim.policy import Budget
from efficient_optim.registry import UnknownOptionError, create_optimizer, optimizer_entry

DYNAMIC = "qadamw+budget_bpp=4.0+allocator=dynamic+warmup=2+every=2+patience=1"


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(512, 64), torch.nn.Linear(64, 128))


def tiny(corpus, **kw) -> RunConfig:
    base = dict(data=str(corpus), layers=1, width=32, heads=2, context=16, batch_size=4, steps=12, log_every=4,
                eval_every=0, eval_batches=2, checkpoint_every=4, device="cpu", optimizer=DYNAMIC)  # fmt: skip
    base.update(kw)
    return RunConfig(**base)


# ------------------------------------------------------------------------------------- budget settings
def test_budget_settings_build_a_budget_policy_with_parameter_names():
    opt = create_optimizer("qadamw", _model(), lr=1e-3, budget_bpp=1.5, allocator="dynamic", warmup=3, every=7, patience=4)
    policy = opt.policy
    assert isinstance(policy, Budget)
    assert (policy.bytes_per_param, policy.allocator, policy.warmup, policy.every, policy.patience) == (1.5, "dynamic", 3, 7, 4)
    assert opt.param_groups[0]["param_names"] == ["0.weight", "1.weight", "1.bias"]
    assert create_optimizer("hybrid_adam", _model(), budget_bytes=200_000).policy.bytes == 200_000
    assert "budget_bpp" in optimizer_entry("lion").keywords() and optimizer_entry("lion").takes_budget
    assert not optimizer_entry("adamw").takes_budget


@pytest.mark.parametrize("kwargs,message", [
    ({"budget_bpp": "abc"}, r"invalid budget_bpp='abc'"),
    ({"budget_bpp": -1.0}, r"invalid budget_bpp=-1.0"),
    ({"budget_bytes": 1.5}, r"invalid budget_bytes=1.5"),
    ({"budget_bpp": 1.5, "budget_bytes": 100}, "not both"),
    ({"allocator": "dynamic"}, "without a budget"),
    ({"budget_bpp": 1.5, "allocator": "greedy"}, "invalid allocator='greedy'"),
    ({"budget_bpp": 1.5, "every": 0}, "invalid every=0"),
    ({"budget_bpp": 1.5, "warmup": 2.5}, "invalid warmup=2.5"),
    ({"budget_bpp": 1.5, "policy": Budget(bytes_per_param=2.0)}, "not both"),
    ({"budget_bpp": 0.01}, "cheapest plan needs"),
])  # fmt: skip
def test_bad_budget_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_optimizer("qadamw", _model(), **kwargs)


def test_a_budget_on_an_optimizer_without_plans_is_refused():
    with pytest.raises(UnknownOptionError, match="takes no memory budget.*qadamw"):
        create_optimizer("adamw", _model(), budget_bpp=1.5)
    with pytest.raises(UnknownOptionError, match="did you mean 'budget_bpp'"):
        create_optimizer("qadamw", _model(), budget_bbp=1.5)


def test_a_bad_budget_spec_fails_before_training(corpus, tmp_path, capsys):
    rc = cli.main(["bench", "--optimizers", "qadamw+budget_bpp=1.5+allocator=nosuch", "--data", str(corpus), "--steps", "2",
                   "--out", str(tmp_path / "o")])  # fmt: skip
    assert rc == 2 and "invalid allocator='nosuch'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------- the plan log
def test_the_plan_is_logged_within_budget_and_resumes_exactly(corpus, tmp_path):
    full = train_run(tiny(corpus), tmp_path / "full", callbacks=[PlanLogCallback()])
    records = plan_records(tmp_path / "full")
    assert records[0]["reason"] == "start" and records[0]["step"] == 1 and "numel" in records[0]
    assert {r["step"] for r in records} >= {4, 8, 12}  # every log step
    changes = [r for r in records if r["reason"] == "change"]
    assert changes and all(r["changed"] for r in changes), "the dynamic allocator re-planned and the change was logged"
    assert all(r["state_bytes"] <= r["budget_bytes"] and r["planned_bytes"] <= r["budget_bytes"] for r in records)
    assert records[-1]["transitions"] == full["plan_transitions"] > 0
    assert full["plan_budget_bytes"] == records[-1]["budget_bytes"] and full["monitor_steps"] >= 1
    first = records[0]["codecs"]["transformer.wte.weight"]
    assert set(first) == {"exp_avg", "exp_avg_sq"}
    assert records[0]["bits"]["transformer.h.0.ln_1.weight"] == {"exp_avg": 32.0, "exp_avg_sq": 32.0}

    cut = PlanLogCallback()
    with pytest.raises(KeyboardInterrupt):
        train_run(tiny(corpus), tmp_path / "cut", callbacks=[cut], interrupt_at=6)
    resumed = train_run(tiny(corpus), tmp_path / "cut", callbacks=[PlanLogCallback()])
    assert plan_records(tmp_path / "cut") == records  # the same lines, none twice, after resuming from step 4
    assert resumed["final_val_loss"] == full["final_val_loss"]
    assert resumed["plan_transitions"] == full["plan_transitions"]


def test_effopt_bench_logs_the_plan_of_a_budget_run(corpus, tmp_path, capsys):
    out = tmp_path / "b"
    rc = cli.main(["bench", "--optimizers", f"adamw,{DYNAMIC}", "--data", str(corpus), "--layers", "1", "--width", "32",
                   "--heads", "2", "--context", "16", "--steps", "6", "--eval-every", "0", "--eval-batches", "2",
                   "--no-progress", "--out", str(out)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    budget_dir = next(d for d in out.iterdir() if d.name.startswith("qadamw"))
    assert plan_records(budget_dir / "default" / "seed0") and not plan_records(out / "adamw" / "default" / "seed0")
    report = (out / "report.md").read_text()
    assert "## Optimizer-state plans" in report and "| dynamic |" in report


def test_an_optimizer_without_plans_logs_none(corpus, tmp_path):
    row = train_run(tiny(corpus, optimizer="adamw", steps=4), tmp_path / "r", callbacks=[PlanLogCallback()])
    assert plan_records(tmp_path / "r") == [] and "plan_transitions" not in row


def test_heat_map_and_report_section(corpus, tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    train_run(tiny(corpus), tmp_path / "run", callbacks=[PlanLogCallback()])
    records = plan_records(tmp_path / "run")
    fig = draw_plan_heatmap(records, ([4, 8, 12], [1e-3, 2e-3, 1e-3]), 12, "t", plt)
    heat = [ax for ax in fig.axes if ax.collections and ax.get_ylabel().startswith(("m ", "v "))]
    assert len(heat) == 2  # one panel per state, under the lr panel
    rows = len(heat[0].get_yticklabels())
    assert rows == sum(1 for n, k in records[0]["numel"].items() if k >= 4096)  # small fp32 tensors left out
    plt.close(fig)
    row = json.loads((tmp_path / "run" / "result.json").read_text()) | {"run_id": "run", "settings": "default"}
    section = plan_section(tmp_path, [row])
    assert "## Optimizer-state plans" in section and "dynamic" in section and "![plan_" in section


def test_layer_words():
    assert layer_kind("transformer.wte.weight") == "embedding"
    assert layer_kind("transformer.h.1.attn.c_attn.weight") == "attention"
    assert layer_kind("transformer.h.0.mlp.c_fc.weight") == "MLP"
    assert layer_kind("features.2.weight") == "convolution" and layer_kind("head.1.weight") == "fully connected"
    assert layer_kind("transformer.h.0.mlp.c_fc.bias") == "bias"
    assert block_index("transformer.h.3.attn.c_proj.weight") == 3 and block_index("head.1.weight") is None


# -------------------------------------------------------------------------------------- the suite, quick
@pytest.fixture
def one_thread():
    """One torch thread for the test (24 tiny runs: thread contention on a shared 2-core machine costs more
    than a second thread gains), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_adaptive_suite_quick_end_to_end(corpus, tmp_path, capsys, one_thread):
    out = tmp_path / "p4"
    rc = cli.main(["suite", "p4", "--quick", "--data", str(corpus), "--width", "32", "--heads", "2", "--context", "16",
                   "--layers", "1", "--steps", "8", "--eval-every", "0", "--eval-batches", "2", "--grid", "3",
                   "--no-progress", "--out", str(out)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    suite = json.loads((out / "suite.json").read_text())
    assert suite["suite"] == "adaptive"
    verdicts = suite["verdicts"]
    criteria = " ".join(v["criterion"] for v in verdicts)
    for words in ("same memory, better convergence", "less memory, same convergence", "which layers get the bits",
                  "smallest budget within 0.5%", "monitoring overhead", "never above the budget"):
        assert words in criteria, words
    assert {v["subject"].split(",")[0] for v in verdicts} >= {"LM", "CNN"}
    assert all(v["verdict"] in ("indicative", "measured", "not measurable here") for v in verdicts)
    kept = [v for v in verdicts if "never above the budget" in v["criterion"]]
    assert all("points to 'met'" in v["reason"] for v in kept)
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["errors"]
    budget_runs = [r for r in summary["runs"] if "budget_" in r["optimizer"]]
    assert budget_runs and all(r["state_bytes"] <= r["plan_budget_bytes"] for r in budget_runs)
    q4 = {r["settings"]: r["state_bytes"] for r in summary["runs"] if r["optimizer"] == "qadamw4"}
    for setting, nbytes in q4.items():  # the budget (a) is uniform 4-bit's exact state bytes
        assert any(r["plan_budget_bytes"] == nbytes and r["settings"] == setting for r in budget_runs)
    report = (out / "report.md").read_text()
    assert "## Optimizer-state plans" in report and "### Which layers get the bits (LM)" in report
    assert "### Results: CNN" in report
