"""Hugging Face Trainer, Lightning, torch.compile, and checkpoint robustness (single process)."""

from __future__ import annotations

import copy
import importlib.util
import io

import pytest
import torch

from efficient_optim import create_optimizer

OURS = {  # registry name -> kwargs: every optimizer of the library
    "qadamw8": {}, "qadamw4": {}, "hybrid_adam": {}, "lion8": {"lr": 1e-4}, "sgd8": {"lr": 1e-2},
    "adafactor": {}, "hybrid_lowrank": {"m_codec": "lowrank", "rank": 4}, "lowrank_adam": {"rank": 4},
    "lion": {"lr": 1e-4},
}  # fmt: skip


def make(name: str, params):
    kw = dict(OURS[name])
    registry_name = "hybrid_adam" if name == "hybrid_lowrank" else name
    if registry_name not in ("adafactor",):
        kw.setdefault("lr", 1e-3)
    return create_optimizer(registry_name, params, **kw)


def mlp(seed: int = 0, hidden: int = 96) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 8))


def steps(model, opt, n: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x, y = torch.randn(16, 64, generator=g), torch.randn(16, 8, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


# ------------------------------------------------------------------------------------------ robustness
@pytest.mark.parametrize("name", list(OURS))
def test_checkpoint_without_newer_hyperparameters_loads_with_defaults(name):
    """A state dict from a version that had fewer hyperparameters: every group key the constructor has a
    default for is dropped; loading fills today's defaults and the run continues as the uninterrupted one."""
    full_model, model = mlp(), mlp()
    full, opt = make(name, full_model.parameters()), make(name, model.parameters())
    steps(full_model, full, 4)
    steps(model, opt, 2)
    sd = opt.state_dict()
    explicit = set(OURS[name]) | {"lr", "params"}
    old = copy.deepcopy(sd)
    for group in old["param_groups"]:
        for key in [k for k in group if k not in explicit]:
            del group[key]
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": old}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    model2 = mlp(seed=5)
    model2.load_state_dict(ck["model"])
    opt2 = make(name, model2.parameters())
    opt2.load_state_dict(ck["opt"])
    assert set(opt2.param_groups[0]) >= set(sd["param_groups"][0])
    g = torch.Generator().manual_seed(1)
    for _ in range(2):  # skip the batches the first half consumed
        torch.randn(16, 64, generator=g), torch.randn(16, 8, generator=g)
    for _ in range(2):
        x, y = torch.randn(16, 64, generator=g), torch.randn(16, 8, generator=g)
        opt2.zero_grad()
        torch.nn.functional.mse_loss(model2(x), y).backward()
        opt2.step()
    for a, b in zip(full_model.parameters(), model2.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(OURS))
def test_loading_into_a_model_with_other_shapes_names_the_parameter(name):
    model = mlp()
    opt = make(name, model.parameters())
    steps(model, opt, 1)
    other = mlp(hidden=80)  # 80 x 64 instead of 96 x 64: big enough to be compressed too
    opt2 = make(name, other.parameters())
    with pytest.raises(ValueError, match=r"parameter #0 \(shape \(80, 64\)\)"):
        opt2.load_state_dict(opt.state_dict())


def test_dcp_helper_names_the_parameter_whose_shape_differs(tmp_path):
    from efficient_optim.integrations.distributed import load_checkpoint, save_checkpoint

    model = mlp()
    opt = make("qadamw8", model.parameters())
    steps(model, opt, 1)
    save_checkpoint(tmp_path / "ck", model, opt)
    other = mlp(hidden=80)
    with pytest.raises(ValueError, match=r"'model\.0\.weight' is \(96, 64\) but this run's is \(80, 64\)"):
        load_checkpoint(tmp_path / "ck", other, make("qadamw8", other.parameters()))
    same = mlp(seed=3)
    opt3 = make("qadamw8", same.parameters())
    load_checkpoint(tmp_path / "ck", same, opt3)  # one process, no process group: DCP reads locally
    for a, b in zip(model.parameters(), same.parameters()):
        assert torch.equal(a, b)
    sa, sb = opt.state_dict()["state"], opt3.state_dict()["state"]
    for i in sa:
        for k in sa[i]:
            assert sa[i][k].dtype == sb[i][k].dtype and torch.equal(sa[i][k], sb[i][k]), (i, k)


@pytest.mark.parametrize("name", ["qadamw8", "hybrid_adam"])
def test_torch_compile_of_a_model_trained_by_our_optimizers(name):
    """The compiled model trains as the eager one; compiling the training step with the optimizer inside
    works too (the optimizer's step is excluded from tracing and runs eagerly). ``aot_eager`` exercises
    Dynamo and AOTAutograd without a C++ toolchain; inductor is in the slow test below."""
    eager, compiled = mlp(), mlp()
    opt_e, opt_c = make(name, eager.parameters()), make(name, compiled.parameters())
    cmodel = torch.compile(compiled, backend="aot_eager")

    @torch.compile(backend="aot_eager")
    def train_step(x, y):
        opt_c.zero_grad()
        loss = torch.nn.functional.mse_loss(cmodel(x), y)
        loss.backward()
        opt_c.step()
        return loss

    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(16, 64, generator=g), torch.randn(16, 8, generator=g)
        opt_e.zero_grad()
        torch.nn.functional.mse_loss(eager(x), y).backward()
        opt_e.step()
        train_step(x, y)
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # inductor compiles C++ for the CPU: ~20-60 s on 2 cores
def test_torch_compile_inductor():
    eager, compiled = mlp(), mlp()
    opt_e, opt_c = make("qadamw4", eager.parameters()), make("qadamw4", compiled.parameters())
    cmodel = torch.compile(compiled)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(16, 64, generator=g), torch.randn(16, 8, generator=g)
        for m, o in ((eager, opt_e), (cmodel, opt_c)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------- Hugging Face Trainer
needs_trainer = pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                                   reason="transformers.Trainer needs accelerate (pip install accelerate)")  # fmt: skip


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    return GPT2LMHeadModel(cfg)


def token_dataset(n: int = 48, seq: int = 32):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (n, seq), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


def trainer_args(out, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(out), per_device_train_batch_size=8, learning_rate=3e-3, weight_decay=0.1,
                max_steps=6, warmup_steps=2, lr_scheduler_type="cosine", save_strategy="steps", save_steps=3,
                logging_steps=1, report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
                disable_tqdm=True)  # fmt: skip
    base.update(kw)
    return TrainingArguments(**base)


@needs_trainer
@pytest.mark.timeout(300)
def test_hf_trainer_with_optimizer_by_name_resumes_from_its_checkpoint(tmp_path):
    from transformers import Trainer

    from efficient_optim import QAdamW
    from efficient_optim.integrations.hf import trainer_optimizers

    def run(out, resume=None):
        model = tiny_gpt2()
        args = trainer_args(out)
        trainer = Trainer(model=model, args=args, train_dataset=token_dataset(),
                          optimizers=trainer_optimizers(model, "qadamw4", args))  # fmt: skip
        trainer.train(resume_from_checkpoint=resume)
        return model, trainer

    full, trainer = run(tmp_path / "a")
    assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer,
                      QAdamW)  # fmt: skip
    groups = trainer.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0] and groups[0]["bits"] == 4
    resumed, _ = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-3"))
    for (n, a), b in zip(full.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=n)


@needs_trainer
@pytest.mark.timeout(300)
def test_hf_trainer_subclass_builds_the_named_optimizer(tmp_path):
    from efficient_optim import HybridAdam
    from efficient_optim.integrations.hf import EfficientOptimTrainer

    model = tiny_gpt2()
    trainer = EfficientOptimTrainer(model=model, args=trainer_args(tmp_path, max_steps=2, save_strategy="no"),
                                    train_dataset=token_dataset(16), optimizer_name="hybrid_adam",
                                    optimizer_kwargs={"v_codec": "factored"})  # fmt: skip
    out = trainer.train()
    assert out.global_step == 2 and torch.isfinite(torch.tensor(out.training_loss))
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(opt, HybridAdam)
    wte = model.transformer.wte.weight
    assert {"exp_avg.codes", "exp_avg_sq.row", "exp_avg_sq.col"} <= set(opt.state[wte])


# ---------------------------------------------------------------------------------------- Lightning
@pytest.mark.timeout(300)
def test_lightning_configure_optimizers_fits_and_resumes(tmp_path):
    L = pytest.importorskip("lightning", reason="pip install lightning")
    from efficient_optim import QAdamW
    from efficient_optim.integrations.lightning import configure_optimizers

    class Regressor(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return configure_optimizers(self, "qadamw8", lr=3e-3, weight_decay=0.1, warmup_steps=2, total_steps=6)

    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(48, 64, generator=g), torch.randn(48, 8, generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=16)  # 3 steps per epoch, fixed order

    def fit(epochs, ckpt=None):
        module = Regressor()
        trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
        trainer.fit(module, loader, ckpt_path=ckpt)
        return module, trainer

    full, trainer = fit(2)
    assert isinstance(trainer.optimizers[0], QAdamW) and trainer.global_step == 6
    assert trainer.optimizers[0].state[full.net[0].weight]["exp_avg.codes"].dtype == torch.uint8
    # an epoch boundary: Lightning restarts an unfinished epoch's data from its first batch on resume
    _, trainer = fit(1)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed, trainer = fit(2, ckpt=str(tmp_path / "epoch1.ckpt"))
    assert trainer.global_step == 6
    for a, b in zip(full.parameters(), resumed.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
