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
    TrainingBudget,
    make_controller,
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


def make_controller_for(kind, params, opt):
    gradients = ErrorFeedback(Quantize(8, rounding="stochastic"))
    if kind == "rules":
        return AccordionController(params, gradients=gradients, optimizer=opt, every=2, window=2, threshold=0.05)
    budget = TrainingBudget(bytes_per_param=6.8)  # tight: every decision is projected or planned
    extra = {"choices": LayerChoice("fp32", "fp32")} if kind == "static" else {}  # projected onto the budget
    return make_controller(kind, params, gradients=gradients, optimizer=opt, every=2, window=2, budget=budget, **extra)


def run_with_controller(steps, ckpt_at=None, resume=None, kind="rules"):
    model = make_model()
    params = list(model.parameters())
    opt = eo.AdamW(params, lr=1e-3, policy=ControllerPolicy())
    ctl = make_controller_for(kind, params, opt)
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
        total = 0.0
        for x, y in DATA[(2 * step) % 12:(2 * step) % 12 + 2]:
            loss = F.mse_loss(model(x), y) / 2
            loss.backward()
            total += loss.item()
        acc.step(opt, max_norm=1.0)
        ctl.step(step, total_steps=steps, loss=total)
    return torch.cat([p.detach().reshape(-1) for p in params]), ctl.history, saved, ctl


def test_a_run_with_a_controller_resumes_exactly():
    ref, history, saved, _ = run_with_controller(8, ckpt_at=3)
    assert {tuple(c) for h in history for c in h["choices"].values()} == {("q8", "8bit"), ("q2", "4bit")}  # both used
    resumed, resumed_history, _, _ = run_with_controller(8, resume=saved)
    assert torch.equal(resumed, ref) and resumed_history == history


@pytest.mark.parametrize("kind", ["static", "planner"])
def test_a_run_with_a_budgeted_controller_resumes_exactly(kind):
    ref, history, saved, ctl = run_with_controller(8, ckpt_at=5, kind=kind)
    resumed, resumed_history, _, other = run_with_controller(8, resume=saved, kind=kind)
    assert torch.equal(resumed, ref) and resumed_history == history
    assert all(h["training_bytes"] <= ctl.budget.limit(ctl) for h in history)
    assert all(h["choices"][0] != ["fp32", "fp32"] for h in history)  # the largest layer was always lowered
    mine, theirs = ctl.state_dict(), other.state_dict()
    assert mine["last_loss"] == theirs["last_loss"] and mine["norms"] == theirs["norms"]
    assert all(torch.equal(mine["snapshots"][k], theirs["snapshots"][k]) for k in mine["snapshots"])


class Recording(StaticController):
    """A static controller that keeps the features of every decision."""

    def decide(self, features, step):
        self.seen = getattr(self, "seen", []) + [(step, features)]
        return super().decide(features, step)


def test_features_cos_mg_and_curvature_are_what_they_say():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(300)), torch.nn.Parameter(torch.randn(20000))]
    opt = eo.AdamW(params, lr=1e-2, policy=ControllerPolicy())
    ctl = Recording(params, {1: LayerChoice(momentum="8bit")}, optimizer=opt, every=3)
    losses, thetas, cosines = [], [], {}
    for step in range(7):
        grads = [torch.randn_like(p) + 0.5 for p in params]
        if step % 3 == 0 and step:  # the momentum the optimizer holds now (8-bit for layer 1), decoded
            for k, p in enumerate(params):
                m = opt.plan_of(p)["exp_avg"].decode(opt.state[p], "exp_avg", p)
                cosines[(step, k)] = float(F.cosine_similarity(m.reshape(-1), grads[k].reshape(-1), dim=0))
        for k, (p, g) in enumerate(zip(params, grads)):
            ctl.observe(k, g)
            p.grad = g
        opt.step()
        losses.append(float(step) ** 2)
        ctl.step(step, total_steps=7, loss=losses[-1])
        thetas.append([p.detach().clone() for p in params])
    assert opt.plan_of(params[1])["exp_avg"].bits == 8
    (s0, f0), (s3, f3), (s6, f6) = ctl.seen
    assert (s0, s3, s6) == (0, 3, 6)
    assert all(f0[k]["cos_mg"] != f0[k]["cos_mg"] for k in (0, 1))  # NaN: no momentum yet
    assert all(f0[k]["curvature"] != f0[k]["curvature"] for k in (0, 1))  # NaN: no previous decision
    for step, features in ((3, f3), (6, f6)):
        for k in (0, 1):
            assert features[k]["cos_mg"] == pytest.approx(cosines[(step, k)], rel=1e-5)
        moved = [float((a - b).square().sum()) for a, b in zip(thetas[step], thetas[step - 3])]
        assert features[0]["displacement"] == pytest.approx(moved[0], rel=1e-5)  # <= 512 elements: exact
        assert features[1]["displacement"] == pytest.approx(moved[1], rel=0.15)  # sampled every 40th element
        estimate = (losses[step] - losses[step - 3]) / (features[0]["displacement"] + features[1]["displacement"])
        assert features[1]["curvature"] == features[0]["curvature"] == pytest.approx(estimate)
        assert features[0]["curvature"] == pytest.approx((losses[step] - losses[step - 3]) / sum(moved), rel=0.15)
    assert ctl.nbytes() == 4 * (300 + 500)  # the samples: 300 + ceil(20000 / 40) float32
