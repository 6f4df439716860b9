"""Compressor specs, per-layer compressor choices and the static / Accordion controllers."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

import efficient_optim as eo
from efficient_optim.compress import (
    AccordionController,
    ControllerPolicy,
    ErrorFeedback,
    GradAccumulator,
    LayerChoice,
    Quantize,
    StaticController,
    TopK,
    parse_compressor,
)


def test_specs_name_compressors_and_round_trip():
    for spec, kind in [("fp32", Quantize), ("bf16", Quantize), ("q8", Quantize), ("q4", Quantize), ("q2", Quantize),
                       ("top10%", TopK), ("top0.5%/q8", TopK), ("rand25%", eo.compress.RandomK)]:  # fmt: skip
        comp = parse_compressor(spec)
        assert isinstance(comp, kind) and comp.describe() == spec
    assert parse_compressor("q4").bits == 4 and parse_compressor("top0.5%/q8").values.bits == 8
    for bad in ["q3", "top0%", "top150%", "rand5%/q8", "top5%/q3", 8]:
        with pytest.raises(ValueError):
            parse_compressor(bad)
    with pytest.raises(ValueError, match="spec"):
        LayerChoice(grad="q5")


def test_per_key_compressor_keeps_the_residual_and_checkpoints():
    ef = ErrorFeedback(Quantize(8))
    g = torch.randn(1000)
    assert ef.compress(0, g).nbytes == Quantize(8).nbytes(1000)
    residual = ef.residual(0).clone()
    ef.set_compressor(0, "q2")
    assert ef.compressor_for(0).bits == 2 and ef.compressor_for(1).bits == 8
    assert torch.equal(ef.residual(0), residual)  # kept across the change
    assert ef.compress(0, g).nbytes == Quantize(2).nbytes(1000)
    state = ef.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    other = ErrorFeedback(Quantize(8))
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert other.compressor_for(0).bits == 2 and torch.equal(other.residual(0), ef.residual(0))
    ef.set_compressor(0, None)
    assert ef.compressor_for(0).bits == 8
    with pytest.raises(ValueError, match="spec string"):
        ef.set_compressor(0, Quantize(4))
    with pytest.raises(ValueError, match="warm-up"):
        eo.compress.DGC().set_compressor(0, "q4")


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64), torch.nn.GELU(),
                               torch.nn.Linear(64, 4))  # fmt: skip


DATA = [(torch.randn(8, 64, generator=torch.Generator().manual_seed(i)),
         torch.randn(8, 4, generator=torch.Generator().manual_seed(100 + i))) for i in range(12)]  # fmt: skip


def test_static_controller_sets_gradient_bits_and_momentum_plans():
    model = make_model()
    params = list(model.parameters())
    opt = eo.AdamW(params, lr=1e-3, policy=ControllerPolicy())
    choices = {0: LayerChoice("q2", "4bit"), 2: LayerChoice("q4", "8bit")}
    ctl = StaticController(params, choices, gradients=ErrorFeedback(Quantize(8)), optimizer=opt, every=2)
    acc = GradAccumulator(params, ctl.gradients, observer=ctl.observe)
    before = None
    for step in range(4):
        for x, y in DATA[2 * step:2 * step + 2]:
            (F.mse_loss(model(x), y) / 2).backward()
        acc.step(opt)
        before = before or eo.state_bytes(opt)
        ctl.step(step)
    assert acc.compressor.compressor_for(0).bits == 2 and acc.compressor.compressor_for(2).bits == 4
    assert acc.compressor.compressor_for(1).bits == 8  # not chosen: the default
    assert eo.state_bytes(opt) < before  # the two large layers' m moved from fp32 to 4 and 8 bits
    assert opt.plan_of(params[0])["exp_avg"].bits == 4 and opt.plan_of(params[2])["exp_avg"].bits == 8
    assert opt.plan_of(params[0])["exp_avg_sq"] == opt.plan_of(params[4])["exp_avg_sq"]  # v untouched
    assert [h["step"] for h in ctl.history] == [0, 2] and ctl.history[0]["choices"][0] == ["q2", "4bit"]
    tb = eo.training_bytes(model, opt, accumulator=acc)
    assert tb["grad_buffers"] == (Quantize(2).nbytes(8192) + Quantize(4).nbytes(8192)
                                  + sum(Quantize(8).nbytes(p.numel()) for p in params[1:2] + params[3:])
                                  + sum(Quantize(8).nbytes(p.numel()) for p in params))  # residuals  # fmt: skip
    with pytest.raises(ValueError, match="positions"):
        StaticController(params, {9: LayerChoice("q8")})
    with pytest.raises(ValueError, match="ControllerPolicy"):
        StaticController(params, choices, optimizer=eo.AdamW(params, lr=1e-3))


def observe_all(ctl, norms):
    for key, n in enumerate(norms):
        if n is not None:
            ctl.observe(key, torch.full((4,), n / 2))  # ||g|| = n


def test_accordion_marks_changing_layers_warmup_and_lr_drops_critical():
    params = [torch.nn.Parameter(torch.zeros(4)) for _ in range(3)]
    opt = eo.AdamW(params, lr=1e-3, policy=ControllerPolicy())
    low, high = LayerChoice("q2"), LayerChoice("q8")
    ctl = AccordionController(params, low=low, high=high, gradients=ErrorFeedback(Quantize(8)), optimizer=opt,
                              every=5, window=5, warmup_steps=3)  # fmt: skip
    for step in range(20):
        jump = 3.0 if step >= 6 else 1.0  # layer 1's gradient norm triples at step 6
        observe_all(ctl, [1.0, jump, None])
        if step == 14:
            opt.param_groups[0]["lr"] = 4e-4  # a step schedule's drop before the decision at 15
        got = ctl.step(step)
        if step == 0:
            assert got == {0: high, 1: high, 2: high}  # warm-up (and no previous decision)
        elif step == 5:
            assert got == {0: low, 1: low, 2: high}  # stable; layer 2 was never observed
        elif step == 10:
            assert got == {0: low, 1: high, 2: high}  # window mean 1 -> 3: critical
        elif step == 15:
            assert got == {0: high, 1: high, 2: high}  # the lr fell by 60 %
        else:
            assert got is None or step == 20
    assert ctl.gradients.compressor_for(0).bits == 8 and ctl.gradients.compressor_for(1).bits == 8
    assert [h["lr"] for h in ctl.history] == [1e-3, 1e-3, 1e-3, 4e-4]


def run_with_controller(steps, ckpt_at=None, resume=None):
    model = make_model()
    params = list(model.parameters())
    opt = eo.AdamW(params, lr=1e-3, policy=ControllerPolicy())
    ctl = AccordionController(params, gradients=ErrorFeedback(Quantize(8, rounding="stochastic")), optimizer=opt,
                              every=2, window=2, threshold=0.05)  # fmt: skip
    acc = GradAccumulator(params, ctl.gradients, observer=ctl.observe)
    start = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["opt"])
        acc.load_state_dict(resume["acc"])
        ctl.load_state_dict(resume["ctl"])
        start = resume["step"]
    saved = None
    for step in range(start, steps):
        if step == ckpt_at:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "acc": acc.state_dict(),
                        "ctl": ctl.state_dict(), "step": step}, buf)  # fmt: skip
            buf.seek(0)
            saved = torch.load(buf, weights_only=True)
        for x, y in DATA[(2 * step) % 12:(2 * step) % 12 + 2]:
            (F.mse_loss(model(x), y) / 2).backward()
        acc.step(opt, max_norm=1.0)
        ctl.step(step)
    return torch.cat([p.detach().reshape(-1) for p in params]), ctl.history, saved


def test_a_run_with_a_controller_resumes_exactly():
    ref, history, saved = run_with_controller(8, ckpt_at=3)
    assert {tuple(c) for h in history for c in h["choices"].values()} == {("q8", "8bit"), ("q2", "4bit")}  # both used
    resumed, resumed_history, _ = run_with_controller(8, resume=saved)
    assert torch.equal(resumed, ref) and resumed_history == history
