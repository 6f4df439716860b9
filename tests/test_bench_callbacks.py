"""Callbacks of a benchmark run: when each hook is called, checkpointed state, no effect on the trajectory, and
the probe attached without any optimizer hook."""

import json

import pytest
import torch

from efficient_optim.bench.callbacks import Callback, CallbackList
from efficient_optim.bench.config import RunConfig
from efficient_optim.bench.probe_callback import StateProbeCallback
from efficient_optim.bench.train import train_run


def tiny(corpus, **kw) -> RunConfig:
    base = dict(data=str(corpus), layers=1, width=32, heads=2, context=16, batch_size=4, steps=8, log_every=2,
                eval_every=4, eval_batches=2, checkpoint_every=4, device="cpu")  # fmt: skip
    base.update(kw)
    return RunConfig(**base)


class Recorder(Callback):
    """Records every hook call; its count of optimizer steps is checkpointed state."""

    def __init__(self):
        self.calls, self.steps_seen = [], 0

    def on_run_start(self, ctx):
        self.calls.append(("start", ctx.step))

    def on_before_optimizer_step(self, ctx, step):
        self.calls.append(("before", step))
        assert all(p.grad is not None for p in ctx.model.parameters())

    def on_after_optimizer_step(self, ctx, step):
        self.calls.append(("after", step))
        self.steps_seen += 1

    def on_step_end(self, ctx, step, metrics):
        self.calls.append(("end", step))
        assert set(metrics) == {"train_loss", "lr", "grad_norm", "step_time_ms"}

    def on_log(self, ctx, step, record):
        self.calls.append((record["kind"], step))

    def on_eval(self, ctx, step, metrics):
        self.calls.append(("on_eval", step))
        assert "val_loss" in metrics and "test_loss" not in metrics

    def on_run_end(self, ctx, result):
        self.calls.append(("run_end", result["steps"]))
        result["recorder_steps"] = self.steps_seen

    def state_dict(self):
        return {"steps_seen": self.steps_seen}

    def load_state_dict(self, state):
        self.steps_seen = state["steps_seen"]


def test_hooks_are_called_in_order_and_may_add_to_the_result(corpus, tmp_path):
    rec = Recorder()
    row = train_run(tiny(corpus), tmp_path / "r", callbacks=[rec])
    calls = rec.calls
    assert calls[0] == ("start", 0) and calls[-1] == ("run_end", 8)
    assert [c for c in calls if c[0] in ("before", "after", "end")][:3] == [("before", 1), ("after", 1), ("end", 1)]
    assert [s for k, s in calls if k == "after"] == list(range(1, 9))
    assert [s for k, s in calls if k == "train"] == [2, 4, 6, 8]
    assert [s for k, s in calls if k == "on_eval"] == [4, 8]  # every evaluation, the final one included
    assert ("test", 8) in calls and calls.index(("on_eval", 8)) < calls.index(("test", 8))
    assert row["recorder_steps"] == 8
    assert json.loads((tmp_path / "r" / "result.json").read_text())["recorder_steps"] == 8


def test_a_callbacks_state_is_checkpointed_and_resumed(corpus, tmp_path):
    cut = Recorder()
    with pytest.raises(KeyboardInterrupt):
        train_run(tiny(corpus), tmp_path / "r", callbacks=[cut], interrupt_at=6)
    assert cut.steps_seen == 6
    ckpt = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert ckpt["callbacks"] == {"Recorder": {"steps_seen": 4}}
    resumed = Recorder()
    row = train_run(tiny(corpus), tmp_path / "r", callbacks=[resumed])
    assert resumed.calls[0] == ("start", 4) and row["recorder_steps"] == 8  # steps 5-6 are redone, counted once


def test_callbacks_do_not_change_the_run(corpus, tmp_path):
    plain = train_run(tiny(corpus, optimizer="qadamw4+min_quantize_numel=64"), tmp_path / "a")
    probed = train_run(tiny(corpus, optimizer="qadamw4+min_quantize_numel=64"), tmp_path / "b",
                       callbacks=[Recorder(), StateProbeCallback(every=2, early=2, sharpness_every=4, sharpness_iters=2)])  # fmt: skip
    for key in ("final_train_loss", "final_val_loss", "test_loss", "state_bytes", "grad_norm_mean"):
        assert probed[key] == plain[key], key


def test_the_state_probe_attaches_through_callbacks_only(corpus, tmp_path, monkeypatch):
    from torch.optim import optimizer as torch_optimizer

    seen = {}

    class Check(Callback):
        def on_after_optimizer_step(self, ctx, step):
            seen["hooks"] = (len(ctx.optimizer._optimizer_step_pre_hooks), len(ctx.optimizer._optimizer_step_post_hooks),
                             len(torch_optimizer._global_optimizer_pre_hooks), len(torch_optimizer._global_optimizer_post_hooks))  # fmt: skip

    probe = StateProbeCallback(every=2, early=2, sharpness_every=4, sharpness_iters=2)
    train_run(tiny(corpus), tmp_path / "p", callbacks=[probe, Check()])
    assert seen["hooks"] == (0, 0, 0, 0)
    records = [json.loads(x) for x in (tmp_path / "p" / "probes.jsonl").read_text().splitlines()]
    meta = records[0]
    assert meta["kind"] == "meta" and meta["params"][0]["name"] == "transformer.wte.weight"
    assert [r["step"] for r in records if r["kind"] == "sharpness"] == [4, 8]
    assert json.loads((tmp_path / "p" / "probe_overhead.json").read_text())["probe_overhead_s"] > 0


def test_callbacks_must_be_callbacks_and_states_are_keyed_by_class():
    with pytest.raises(TypeError, match="Callback"):
        CallbackList([lambda step, rec: None])
    cbs = CallbackList([Recorder(), Recorder(), StateProbeCallback()])
    assert cbs.keys == ["Recorder", "Recorder.2", "state_probe"]
