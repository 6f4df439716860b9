"""Gradient compression and compression controllers inside benchmark runs (``bench.mango_callback``): compressed
accumulation through the training loop, the controller's decisions in metrics.jsonl, the measured training bytes,
DGC / torch optimizers compressed in place, exact resume, and clear errors for bad settings."""

from __future__ import annotations

import json

import pytest
import torch

from efficient_optim import cli
from efficient_optim.bench.callbacks import Callback
from efficient_optim.bench.config import RunConfig
from efficient_optim.bench.mango_callback import (
    GradientControlCallback,
    build_gradient_compressor,
    controller_options,
    grad_bits,
    momentum_bits,
)
from efficient_optim.bench.train import train_run
from efficient_optim.compress import DGC, ErrorFeedback, NoFeedback


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(corpus, **kw) -> RunConfig:
    base = dict(data=str(corpus), layers=1, width=32, heads=2, context=16, batch_size=4, steps=12, log_every=4,
                eval_every=0, eval_batches=2, checkpoint_every=4, device="cpu", optimizer="qadamw8", grad_accum=2)  # fmt: skip
    base.update(kw)
    return RunConfig(**base)


def records(run_dir, kind):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if f'"{kind}"' in line]


class Snapshot(Callback):
    """Keeps the parameters at the end of the run."""

    def on_run_end(self, ctx, result):
        self.params = [p.detach().clone() for p in ctx.model.parameters()]


def test_specs_build_the_named_compressors_and_controllers():
    ef = build_gradient_compressor("q4")
    assert isinstance(ef, ErrorFeedback) and ef.compressor.bits == 4 and ef.residual_compressor.bits == 8
    assert isinstance(build_gradient_compressor("rand10%+residual=none"), NoFeedback)
    assert build_gradient_compressor("top10%/q8+residual=q4").residual_compressor.bits == 4
    dgc = build_gradient_compressor("dgc+fraction=0.05+momentum=0.5+warmup=4", seed=3)
    assert isinstance(dgc, DGC) and (dgc.fraction, dgc.momentum, dgc.warmup_calls, dgc.seed) == (0.05, 0.5, 4, 3)
    kind, kw = controller_options("rules+every=5+low=q2:4bit+high=q8:bf16")
    assert kind == "rules" and kw["every"] == 5 and (kw["low"].grad, kw["low"].momentum, kw["high"].momentum) == ("q2", "4bit", "bf16")
    kind, kw = controller_options("static+grad=q4+momentum=8bit")
    assert kind == "static" and kw["choices"](0, None).grad == "q4"
    assert grad_bits("fp32", 1000) == 32 and abs(grad_bits("q4", 1024) - 4.25) < 1e-9
    assert momentum_bits("8bit") == 8 and momentum_bits("fp32") == 32 and momentum_bits(None) is None


@pytest.mark.parametrize("setting,message", [
    ({"grad_compression": "q5"}, "unknown compressor spec 'q5'"),
    ({"grad_compression": "q4+residul=q8"}, r"unknown option\(s\) \['residul'\]"),
    ({"grad_compression": "dgc+fractio=0.1"}, "unknown DGC option"),
    ({"controller": "nosuch"}, "unknown kind 'nosuch'"),
    ({"controller": "static"}, "needs grad=<spec>"),
    ({"controller": "rules+low=q2"}, "must look like <grad spec>:<momentum spec>"),
    ({"controller": "rules", "grad_compression": "dgc"}, "cannot change DGC"),
    ({"grad_compression": "q8", "grad_release": True, "clip": 0.0, "grad_accum": 1}, "not with gradient release"),
])  # fmt: skip
def test_bad_settings_are_named(corpus, setting, message):
    with pytest.raises(ValueError, match=message):
        tiny(corpus, **setting).validate()


def test_compressed_accumulation_runs_through_the_loop_and_counts_its_buffers(corpus, tmp_path):
    plain = train_run(tiny(corpus), tmp_path / "plain")
    row = train_run(tiny(corpus, grad_compression="q4"), tmp_path / "q4")
    assert row["gradient_mode"] == "accumulator" and not row["diverged"]
    n = row["num_params"]
    # 4-bit buffers + 8-bit residuals + one full gradient at a time, instead of every gradient in fp32
    assert row["grad_buffer_bytes"] < 0.7 * 4 * n and row["grad_bytes"] < plain["grad_bytes"]
    assert row["training_bytes_peak"] < plain["training_bytes_per_param"] * n
    assert row["training_bytes_per_param"] == row["training_bytes_peak"] / n
    assert abs(row["final_val_loss"] - plain["final_val_loss"]) < 0.05  # 12 steps: compression changes little
    trains = records(tmp_path / "q4", "train")
    assert all(r["grad_norm"] is not None and r["grad_norm"] == r["grad_norm"] for r in trains)  # measured from buffers


@pytest.mark.parametrize("accum,clip", [(1, 0.0), (2, 1.0)])
def test_an_exact_compressor_reproduces_plain_training(corpus, tmp_path, accum, clip):
    a, b = Snapshot(), Snapshot()
    kw = dict(optimizer="qadamw+bits=32", grad_accum=accum, clip=clip)
    train_run(tiny(corpus, **kw), tmp_path / "plain", callbacks=[a])
    train_run(tiny(corpus, **kw, grad_compression="fp32+residual=none"), tmp_path / "fp32", callbacks=[b])
    for x, y in zip(a.params, b.params):
        if accum == 1:  # one micro-batch, no clipping: the same gradient, the same steps
            assert torch.equal(x, y)
        else:  # the micro-batches are summed in another order; Adam magnifies the last bits of tiny gradients
            torch.testing.assert_close(x, y, rtol=0, atol=1e-4)


def test_dgc_and_torch_optimizers_compress_in_place(corpus, tmp_path):
    row = train_run(tiny(corpus, optimizer="sgd+momentum=0", grad_compression="dgc+fraction=0.1"), tmp_path / "dgc")
    assert row["gradient_mode"] == "in_place" and row["compressor_state_bytes"] == 8 * row["num_params"]
    row = train_run(tiny(corpus, optimizer="adamw", grad_compression="rand25%+residual=none"), tmp_path / "rand")
    assert row["gradient_mode"] == "in_place" and row["compressor_state_bytes"] == 0 and not row["diverged"]


def test_controller_decisions_are_logged_with_bits_and_overhead(corpus, tmp_path):
    cfg = tiny(corpus, grad_compression="q8", controller="rules+every=3+warmup_steps=3")
    row = train_run(cfg, tmp_path / "r")
    lines = records(tmp_path / "r", "controller")
    assert [r["decision_step"] for r in lines] == [0, 3, 6, 9] and row["controller_decisions"] == 4
    first = lines[0]
    assert set(first["grad"]) == set(first["numel"]) and all(v == "q8" for v in first["grad"].values())  # warm-up: high
    assert all(v == 8 for v in first["momentum_bits"].values()) and first["lr"] > 0
    later = lines[-1]["grad_bits"]
    assert all(b in (grad_bits("q2", n), grad_bits("q8", n)) for b, n in zip(later.values(), first["numel"].values()))
    assert row["controller_kind"] == "rules" and 0 <= row["controller_overhead"] < 1


@pytest.mark.parametrize("controller", ["rules+every=3+warmup_steps=2", "planner+every=3+budget_bpp=7",
                                        "learned+every=3+budget_bpp=7"])
def test_a_resumed_run_with_a_controller_is_exact(corpus, tmp_path, controller):
    cfg = tiny(corpus, grad_compression="q4", controller=controller, steps=14)
    full, resumed = Snapshot(), Snapshot()
    row_full = train_run(cfg, tmp_path / "full", callbacks=[full])
    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, tmp_path / "cut", interrupt_at=6)  # last checkpoint at step 4: steps 5-6 are redone
    row = train_run(cfg, tmp_path / "cut", callbacks=[resumed])
    assert row["resumed_from_steps"] == [4]
    for x, y in zip(full.params, resumed.params):
        assert torch.equal(x, y)
    assert row["final_val_loss"] == row_full["final_val_loss"]
    a, b = records(tmp_path / "full", "controller"), records(tmp_path / "cut", "controller")
    strip = lambda rs: [{k: v for k, v in r.items() if k != "numel"} for r in rs]  # noqa: E731
    assert strip(a) == strip(b)  # the same decisions, each logged once


def test_bench_command_takes_the_settings(corpus, tmp_path, capsys):
    out = tmp_path / "b"
    rc = cli.main(["bench", "--optimizers", "qadamw8", "--data", str(corpus), "--steps", "4", "--layers", "1", "--width", "32",
                   "--heads", "2", "--context", "16", "--batch", "4", "--eval-batches", "2", "--device", "cpu",
                   "--grad-accum", "2", "--grad-compression", "q4", "--controller", "static+grad=q2+momentum=4bit+every=2",
                   "--no-progress", "--out", str(out)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    row = json.loads((out / "summary.json").read_text())["runs"][0]
    assert row["controller_kind"] == "static" and row["grad_compression"] == "q4"
    rc = cli.main(["bench", "--optimizers", "qadamw8", "--data", str(corpus), "--steps", "2", "--grad-compression", "q3",
                   "--out", str(tmp_path / "bad")])  # fmt: skip
    assert rc == 2 and "unknown compressor spec 'q3'" in capsys.readouterr().err


def test_callback_needs_something_to_do():
    with pytest.raises(ValueError, match="needs a gradient compression spec"):
        GradientControlCallback()
