"""The benchmark harness: training loop, resume, divergence, runner matrix, reports, suites, CLI errors."""

import dataclasses
import json

import pytest
import torch

from efficient_optim.bench.config import RunConfig, parse_spec
from efficient_optim.bench.report import build_report, pareto_front
from efficient_optim.bench.runner import plan_matrix, run_matrix
from efficient_optim.bench.train import ConfigMismatch, lr_factor, train_run
from efficient_optim.cli import main
from efficient_optim.registry import _REGISTRY, register_optimizer

SUMMARY_FIELDS = ("optimizer", "seed", "steps", "final_train_loss", "final_val_loss", "val_ppl", "state_bytes",
                  "num_params", "peak_memory_bytes", "step_time_ms", "tokens_per_s", "diverged")  # fmt: skip


def tiny(corpus, **kw) -> RunConfig:
    base = dict(data=str(corpus), layers=1, width=32, heads=2, context=16, batch_size=4, steps=12, log_every=2,
                eval_every=6, eval_batches=2, checkpoint_every=4, device="cpu")  # fmt: skip
    base.update(kw)
    return RunConfig(**base)


def train_lines(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("optimizer", ["adamw", "qadamw4+min_quantize_numel=64"])
def test_an_interrupted_run_resumes_to_the_identical_result(corpus, tmp_path, optimizer):
    cfg = tiny(corpus, optimizer=optimizer)
    full = train_run(cfg, tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, tmp_path / "cut", interrupt_at=7)  # last checkpoint at step 4: steps 5-7 are redone
    assert (tmp_path / "cut" / "checkpoint.pt").is_file() and not (tmp_path / "cut" / "result.json").exists()
    resumed = train_run(cfg, tmp_path / "cut")
    assert resumed["resumed_from_steps"] == [4]
    assert resumed["final_val_loss"] == full["final_val_loss"]
    assert resumed["final_train_loss"] == full["final_train_loss"]
    strip = lambda recs: [{k: v for k, v in r.items() if "time" not in k} for r in recs]  # noqa: E731
    assert strip(train_lines(tmp_path / "cut")) == strip(train_lines(tmp_path / "full"))  # nothing lost, nothing twice
    assert not (tmp_path / "cut" / "checkpoint.pt").exists()


def test_a_run_records_every_summary_field(corpus, tmp_path):
    row = train_run(tiny(corpus, target_ppl=1e9), tmp_path / "r")
    for key in SUMMARY_FIELDS:
        assert row[key] is not None, key
    assert row["steps"] == 12 and not row["diverged"]
    assert row["state_bytes_per_param"] == pytest.approx(8.0, rel=1e-3)  # AdamW: two fp32 moments (+ step counters)
    assert row["peak_memory_bytes"] == row["param_bytes"] + row["grad_bytes"] + row["state_bytes"]
    assert row["param_bytes"] == 4 * row["num_params"] == row["grad_bytes"]
    assert row["steps_to_target"] == 6  # the first evaluation already meets an unreachable-to-miss target
    assert row["tokens_per_s"] == pytest.approx(4 * 16 / (row["step_time_ms"] / 1e3))
    recs = train_lines(tmp_path / "r")
    assert [r["step"] for r in recs if r["kind"] == "eval"] == [6, 12]
    assert all(r["update_ratio"] > 0 and r["grad_norm"] > 0 for r in recs if r["kind"] == "train")
    # the machine's load while the run was timed, and the spread of its step times
    assert row["load_avg_start"] >= 0 and row["load_avg_end"] >= 0 and row["cpu_cores"] >= 1
    assert row["torch_threads"] == torch.get_num_threads() and row["cpu_per_wall"] > 0
    assert row["timing_loaded"] == (max(row["load_avg_start"], row["load_avg_end"]) > row["cpu_cores"] + 0.5)
    assert row["step_time_q1_ms"] <= row["step_time_ms"] <= row["step_time_q3_ms"]


def test_default_evaluations_and_the_final_sharpness(corpus, tmp_path):
    row = train_run(tiny(corpus, steps=10, eval_every=None, sharpness_iters=4, checkpoint_every=0), tmp_path / "s")
    assert [r["step"] for r in train_lines(tmp_path / "s") if r["kind"] == "eval"] == [2, 4, 6, 8, 10]
    assert row["sharpness"] > 0 and isinstance(row["sharpness_converged"], bool)
    assert "sharpness" not in train_run(tiny(corpus, steps=2, checkpoint_every=0), tmp_path / "n")


def test_final_sharpness_is_the_top_positive_curvature_even_when_a_negative_one_is_larger():
    from efficient_optim.bench.train import final_sharpness

    class Saddle(torch.nn.Module):  # loss 0.5 * (x0² - 3 x1²): eigenvalues +1 and -3
        def __init__(self):
            super().__init__()
            self.x = torch.nn.Parameter(torch.tensor([0.3, -0.2]))

    class Task:
        def train_batch(self, gen):
            return torch.tensor([1.0, -3.0])

        def loss(self, model, batch):
            return 0.5 * (batch * model.x**2).sum()

    model = Saddle()
    out = final_sharpness(Task(), model, iters=50)
    assert out["extreme_eigenvalue"] == pytest.approx(-3.0, rel=1e-3)
    assert out["sharpness"] == pytest.approx(1.0, rel=1e-3) and out["converged"]
    assert model.training and model.x.grad is None


def test_a_folder_written_before_a_setting_existed_still_resumes(corpus, tmp_path):
    cfg = tiny(corpus, steps=2, checkpoint_every=0)
    train_run(cfg, tmp_path / "r")
    path = tmp_path / "r" / "config.json"
    old = json.loads(path.read_text())
    del old["sharpness_iters"]
    path.write_text(json.dumps(old))
    assert train_run(cfg, tmp_path / "r")["steps"] == 2
    with pytest.raises(ConfigMismatch, match="sharpness_iters"):
        train_run(dataclasses.replace(cfg, sharpness_iters=3), tmp_path / "r")


def test_each_run_ends_with_a_test_evaluation_that_changes_nothing_else(corpus, tmp_path):
    cfg = tiny(corpus, steps=6, checkpoint_every=0)
    row = train_run(cfg, tmp_path / "t")
    assert row["test_loss"] > 0 and row["test_ppl"] == pytest.approx(2.718281828 ** row["test_loss"])
    assert row["test_fraction"] == 0.05 and row["test_loss"] != row["final_val_loss"]
    lines = train_lines(tmp_path / "t")
    assert lines[-1] == {"kind": "test", "step": 6, "test_loss": row["test_loss"], "test_ppl": row["test_ppl"]}
    none = train_run(dataclasses.replace(cfg, test_fraction=0.0), tmp_path / "n")
    assert none["test_loss"] is None and "test" not in {r["kind"] for r in train_lines(tmp_path / "n")}
    # the test split comes out of the held-out part only: training is the same with or without it
    assert none["final_train_loss"] == row["final_train_loss"] and none["state_bytes"] == row["state_bytes"]
    assert none["final_val_loss"] != row["final_val_loss"]  # validation is the held-out part minus the test split


def test_a_folder_written_before_the_test_split_resumes_without_one(corpus, tmp_path):
    from efficient_optim.bench.preflight import check_resume

    out = tmp_path / "m"
    old = plan_matrix(tiny(corpus, steps=6, test_fraction=0.0), ["adamw"], 1)[0]
    with pytest.raises(KeyboardInterrupt):
        train_run(old, out / old.run_id, interrupt_at=5)
    stored = {k: v for k, v in old.to_dict().items() if k != "test_fraction"}  # as the harness wrote it before
    (out / "plan.json").write_text(json.dumps({"runs": [stored]}))
    (out / old.run_id / "config.json").write_text(json.dumps(stored))
    new = plan_matrix(tiny(corpus, steps=6), ["adamw"], 1)  # today's default has a test split
    with pytest.raises(ConfigMismatch, match="test_fraction: 0.0 -> 0.05"):
        train_run(new[0], out / new[0].run_id)  # a run that started without one does not switch mid-way
    check_resume(new, out)  # --resume with today's options is accepted ...
    row = run_matrix(new, out, resume=True, progress=False)["runs"][0]
    assert row["resumed_from_steps"] == [4] and row["test_loss"] is None  # ... and the run continues as it began


def test_a_diverging_run_is_recorded_not_crashed(corpus, tmp_path):
    class Blowup(torch.optim.SGD):
        def step(self, closure=None):
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        p.mul_(50.0)

    register_optimizer("test_blowup", lambda params, **kw: Blowup(params, lr=kw["lr"]), "test only")
    try:
        row = train_run(tiny(corpus, optimizer="test_blowup"), tmp_path / "d")
    finally:
        del _REGISTRY["test_blowup"]
    assert row["diverged"] and row["diverged_at_step"] is not None and row["diverged_at_step"] < 12
    assert row["final_val_loss"] is None
    assert train_lines(tmp_path / "d")[-1]["kind"] == "diverged"


def test_resuming_with_other_settings_is_refused(corpus, tmp_path):
    cfg = tiny(corpus, steps=4)
    train_run(cfg, tmp_path / "r")
    with pytest.raises(ConfigMismatch, match="lr"):
        train_run(dataclasses.replace(cfg, lr=1.0), tmp_path / "r")


def test_the_matrix_resumes_and_rebuilds_its_report(corpus, tmp_path, capsys):
    out = tmp_path / "m"
    plan = plan_matrix(tiny(corpus, steps=6), ["adamw", "sgd"], 2)
    with pytest.raises(KeyboardInterrupt):
        train_run(plan[1], out / plan[1].run_id, interrupt_at=5)  # leaves a half-run behind
    with pytest.raises(FileNotFoundError):
        build_report(out)
    summary = run_matrix(plan, out, progress=False)
    assert len(summary["runs"]) == 4 and not summary["errors"] and not summary["pending"]
    assert summary["runs"][1]["resumed_from_steps"] == [4]
    with pytest.raises(FileExistsError, match="--resume"):
        run_matrix(plan, out, progress=False)
    again = run_matrix(plan, out, resume=True, progress=False)  # everything finished: nothing reruns
    assert [r["final_val_loss"] for r in again["runs"]] == [r["final_val_loss"] for r in summary["runs"]]
    for name in ("summary.json", "report.md"):
        (out / name).unlink(missing_ok=True)
    assert main(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "| adamw | 2/2 |" in report and "| sgd | 2/2 |" in report
    assert all((out / p).is_file() for p in ("loss_curves.png", "pareto.png", "step_time.png", "summary.json"))
    assert "vs AdamW" in capsys.readouterr().out


def test_a_failing_run_is_recorded_and_the_matrix_goes_on(corpus, tmp_path):
    plan = plan_matrix(tiny(corpus, steps=2), ["adamw", "qadamw8+bits=3"], 1)
    summary = run_matrix(plan, tmp_path / "m", progress=False)
    assert [r["optimizer"] for r in summary["runs"]] == ["adamw"]
    assert summary["errors"][0]["optimizer"] == "qadamw8+bits=3" and "bits" in summary["errors"][0]["error"]


def test_the_digits_cnn_trains_as_a_second_architecture(tmp_path):
    row = train_run(RunConfig(model="digits-cnn", optimizer="qadamw8", steps=30, batch_size=32, lr=3e-3,
                              device="cpu", checkpoint_every=0), tmp_path / "cnn")  # fmt: skip
    assert row["val_accuracy"] > 0.3 and row["throughput_unit"] == "samples"
    assert 0 <= row["test_accuracy"] <= 1 and row["test_loss"] > 0  # the test samples are apart from validation


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = RunConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0) and lr_factor(100, cfg) == pytest.approx(0.1)
    assert all(lr_factor(s, cfg) >= lr_factor(s + 1, cfg) for s in range(10, 100))


def test_specs_and_pareto_front():
    assert parse_spec("lowrank_adam+rank=16+lr=1e-3+fused=false") == ("lowrank_adam", {"rank": 16, "lr": 1e-3, "fused": False})
    with pytest.raises(ValueError, match="key=value"):
        parse_spec("qadamw4+oops")
    assert pareto_front([(1, 5.0), (2, 4.0), (3, 4.5), (4, 3.0)]) == [(1, 5.0), (2, 4.0), (4, 3.0)]
    with pytest.raises(ValueError, match="steps"):
        RunConfig(steps=0).validate()


def test_the_baselines_suite_runs_end_to_end_with_verdicts(corpus, tmp_path, capsys):
    out = tmp_path / "baselines"
    rc = main(["suite", "baselines", "--quick", "--data", str(corpus), "--steps", "3", "--layers", "1", "--width", "32",
               "--heads", "2", "--context", "16", "--batch", "4", "--eval-every", "3", "--eval-batches", "1",
               "--out", str(out), "--no-progress"])  # fmt: skip
    assert rc == 0
    suite = json.loads((out / "suite.json").read_text())
    kinds = {v["criterion"] for v in suite["verdicts"]}
    assert "optimizer memory >= 2x below adamw" in kinds and "< 2% perplexity degradation vs adamw" in kinds
    # --quick: one seed, few steps: every target is a hint, never met or failed
    assert {v["verdict"] for v in suite["verdicts"]} <= {"indicative", "not measurable here", "measured"}
    assert any(v["verdict"] == "indicative" for v in suite["verdicts"])
    sharp = [v for v in suite["verdicts"] if v["criterion"].startswith("sharpness")]
    assert sharp and all(v["verdict"] == "measured" for v in sharp)
    assert "## Verdicts: Baselines (P1)" in (out / "report.md").read_text()
    assert suite["suite"] == "baselines" and "test loss" in (out / "report.md").read_text()
    suite["suite"] = "p1"  # a folder written when suites were named by protocol id still rebuilds
    (out / "suite.json").write_text(json.dumps(suite))
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0 and "## Verdicts: Baselines (P1)" in (out / "report.md").read_text()
    assert "test ppl" in capsys.readouterr().out  # the terminal table


@pytest.mark.parametrize(
    "argv,message",
    [
        (["bench", "--optimizers", "adamw9"], "unknown optimizer 'adamw9'"),
        (["bench", "--optimizers", "qadamw4+bits"], "key=value"),
        (["bench", "--data", "/no/such/file.txt"], "data path not found"),
        (["bench", "--resume"], "--resume needs --out"),
        (["bench", "--steps", "0"], "steps must be a positive integer"),
        (["bench", "--log", "mlflow"], "unknown --log"),
        (["suite", "p99"], "unknown suite"),
        (["report", "/no/such/folder"], "not a run folder"),
    ],
)
def test_cli_errors_name_the_problem(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_the_p8_plan_covers_every_configuration_on_both_architectures():
    from efficient_optim.bench.protocols.weight_splitting import A, B, C, D, E, WeightSplitting

    plan, _ = WeightSplitting().plan(RunConfig(steps=10), 3, quick=False)
    runs = {(c.optimizer, c.settings, c.model, c.param_dtype, c.grad_release) for c in plan}
    for spec in (A, B, C, E):
        assert (spec, "lm", "gpt2-tiny", "bfloat16", False) in runs
    for spec in (A, B, C):
        assert (spec, "cnn", "digits-cnn", "bfloat16", False) in runs
    assert (D, "lm", "gpt2-tiny", "float32", False) in runs and (D, "cnn", "digits-cnn", "float32", False) in runs
    assert (E, "lm-release", "gpt2-tiny", "bfloat16", True) in runs
    assert all(c.clip == 0 for c in plan if c.grad_release)
    assert len({c.run_id for c in plan}) == len(plan)
    assert sum(1 for c in plan if c.optimizer == B and c.settings == "lm") == 3


def test_tensorboard_logging_writes_event_files(corpus, tmp_path):
    pytest.importorskip("tensorboard")
    plan = plan_matrix(tiny(corpus, steps=2), ["adamw"], 1)
    run_matrix(plan, tmp_path / "tb", log=("tensorboard",), progress=False)
    assert list((tmp_path / "tb" / "tensorboard").rglob("events.out.tfevents.*"))
