"""Every registry name constructs, steps and is measured; our optimizers resume exactly from weights-only checkpoints."""

import copy
import io

import pytest
import torch

import efficient_optim as eo
from efficient_optim.registry import optimizer_entry

OURS = ["qadamw", "qadamw8", "qadamw4", "hybrid_adam", "lion", "lion8", "sgd8", "adafactor"]


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))


def step(m, opt, seed):
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(seed))
    opt.zero_grad()
    m(x).pow(2).mean().backward()
    opt.step()


@pytest.mark.parametrize("name", eo.list_optimizers())
def test_every_name_constructs_steps_and_is_measured(name):
    entry = optimizer_entry(name)
    if entry.cuda_only and not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA only"):
            eo.create_optimizer(name, model(), lr=1e-3)
        return
    if not entry.available():
        pytest.skip(f"{entry.requires} not installed")
    m = model()
    before = [p.detach().clone() for p in m.parameters()]
    extra = {"dim": 64, "n_heads": 1} if name == "adam_mini" else {}  # a plain model has no attention config
    extra.update({"rank": 16} if name in ("galore_adamw", "apollo_adamw") else {})
    opt = eo.create_optimizer(name, m, lr=1e-3, **extra)
    for i in range(2):
        step(m, opt, i)
    assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert eo.state_bytes(opt) > 0


@pytest.mark.parametrize("name", OURS)
def test_our_optimizers_resume_exactly_from_weights_only_checkpoints(name):
    kw = {"lr": 1e-3, "min_quantize_numel": 0}
    a = model()
    oa = eo.create_optimizer(name, a, **kw)
    for i in range(6):
        step(a, oa, i)
    b = model()
    ob = eo.create_optimizer(name, b, **kw)
    for i in range(3):
        step(b, ob, i)
    buf = io.BytesIO()
    torch.save({"model": b.state_dict(), "opt": ob.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    c = model()
    oc = eo.create_optimizer(name, c, **kw)
    c.load_state_dict(ckpt["model"])
    oc.load_state_dict(copy.deepcopy(ckpt["opt"]))
    for i in range(3, 6):
        step(c, oc, i)
    for p, q in zip(a.parameters(), c.parameters()):
        assert torch.equal(p, q), name


def test_unknown_names_and_missing_packages_say_what_to_do():
    with pytest.raises(ValueError, match="known:"):
        eo.create_optimizer("adamw9", model())
    if optimizer_entry("adam_mini").available():
        with pytest.raises(ValueError, match="needs parameter names"):
            eo.create_optimizer("adam_mini", list(model().parameters()), lr=1e-3)
        with pytest.raises(ValueError, match="dim= and n_heads="):
            eo.create_optimizer("adam_mini", model(), lr=1e-3)


def test_adam_mini_takes_named_parameters_or_reads_a_transformers_config():
    if not optimizer_entry("adam_mini").available():
        pytest.skip("adam-mini not installed")
    from efficient_optim.bench.models import build_lm

    lm = build_lm("gpt2-tiny", 64, layers=1, width=32, heads=2)
    for arg, extra in ((lm, {}), (lm.named_parameters(), {"dim": 32, "n_heads": 2})):
        opt = eo.create_optimizer("adam_mini", arg, lr=1e-3, **extra)
        x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
        lm(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        n = sum(p.numel() for p in lm.parameters())
        assert 0 < eo.state_bytes(opt) < 4.2 * n  # fp32 m plus one v per block/head


def test_projection_baselines_count_their_projection_matrices():
    if not optimizer_entry("galore_adamw").available():
        pytest.skip("galore-torch not installed")
    m = model()
    opt = eo.create_optimizer("galore_adamw", m, lr=1e-3, rank=16)
    step(m, opt, 0)
    keys = {row["key"] for row in eo.state_breakdown(opt)}
    assert "projector.ortho_matrix" in keys  # the projection a GaLore user really holds
