"""PlannerController (measured errors + knapsack under the budget) and the controller kinds registry."""

import sys

import pytest
import torch
import torch.nn.functional as F
from test_compress_controller import DATA, make_model  # the same small model and batches

import efficient_optim as eo
from efficient_optim.compress import (
    CONTROLLER_KINDS,
    GRAD_SPECS,
    MOMENTUM_SPECS,
    AccordionController,
    ControllerPolicy,
    ErrorFeedback,
    GradAccumulator,
    LayerChoice,
    PlannerController,
    Quantize,
    StaticController,
    TrainingBudget,
    make_controller,
    parse_compressor,
)
from efficient_optim.compress.features import decoded_momentum
from efficient_optim.compress.planner import relative_error


def run_planner(bytes_per_param, steps=4, every=2):
    model = make_model()
    params = list(model.parameters())
    opt = eo.AdamW(params, lr=1e-3, policy=ControllerPolicy())
    budget = TrainingBudget(bytes_per_param=bytes_per_param)
    ctl = PlannerController(params, budget=budget, gradients=ErrorFeedback(Quantize(8)), optimizer=opt, every=every)
    acc = GradAccumulator(params, ctl.gradients, observer=ctl.observe)
    for step in range(steps):
        for x, y in DATA[2 * step:2 * step + 2]:
            loss = F.mse_loss(model(x), y)
            (loss / 2).backward()
        acc.step(opt)
        ctl.step(step, total_steps=steps, loss=loss.item())
    return ctl, budget


def test_planner_fills_the_budget_with_the_least_error():
    tight, budget = run_planner(6.6)
    loose, _ = run_planner(40.0)
    limit = budget.limit(tight)
    assert all(h["training_bytes"] <= limit for h in tight.history) and len(tight.history) == 2
    assert tight.history[-1]["training_bytes"] > 0.9 * limit  # the knapsack uses what it is given
    assert {c.grad for c in loose.current.values()} == {"fp32"}  # room for everything: no error at all
    assert {c.momentum for c in loose.current.values()} == {"fp32"}
    assert any(c.grad != "fp32" for c in tight.current.values())
    assert loose.training_bytes() > tight.training_bytes()
    for choice in tight.current.values():
        assert choice.grad in GRAD_SPECS and choice.momentum in MOMENTUM_SPECS


def test_planner_measures_every_option_on_the_real_gradient_and_momentum():
    params = [torch.nn.Parameter(torch.randn(8192)), torch.nn.Parameter(torch.randn(8192))]
    opt = eo.AdamW(params, lr=1e-3, policy=ControllerPolicy())
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # the momentum exists
    ctl = PlannerController(params, budget=TrainingBudget(bytes=10**9), gradients=ErrorFeedback(Quantize(8)),
                            optimizer=opt, sample_elements=4096)  # fmt: skip
    grads = [torch.randn(8192), 100 * torch.randn(8192)]  # layer 1's gradient dominates
    for key, g in enumerate(grads):
        ctl.observe(key, g)
    record = ctl.errors[1]
    sample = grads[1][:4096]
    assert record["grad"]["q4"] == relative_error(parse_compressor("q4").roundtrip(sample), sample)
    assert record["grad"]["fp32"] == 0.0 and record["grad"]["q2"] > record["grad"]["q4"] > record["grad"]["q8"]
    m = decoded_momentum(opt, params[1], "exp_avg")
    assert record["momentum_sq"] == pytest.approx(float(m.square().sum()))
    assert record["momentum"]["fp32"] == 0.0 and record["momentum"]["4bit"] > record["momentum"]["8bit"] > 0
    # a budget that affords q8-grade bytes for one layer only: the dominant layer gets the precision
    budget = TrainingBudget(bytes=ctl.training_bytes({0: LayerChoice("q2", "4bit"), 1: LayerChoice("q8", "8bit")}))
    ctl.budget = budget
    choices = ctl.decide(ctl.features(0), 0)
    assert budget.training_bytes(choices, ctl) <= budget.limit(ctl)
    sizes = {k: parse_compressor(c.grad).nbytes(8192) for k, c in choices.items()}
    assert sizes[1] > sizes[0]
    assert ctl.errors == {}  # the measurements are used once


def test_planner_needs_a_budget_and_checks_its_arguments():
    params = [torch.nn.Parameter(torch.zeros(10))]
    with pytest.raises(ValueError, match="budget"):
        PlannerController(params, budget=None)
    with pytest.raises(ValueError, match="momentum_weight"):
        PlannerController(params, budget=TrainingBudget(bytes=10**6), momentum_weight=-1)
    with pytest.raises(ValueError, match="sample_elements"):
        PlannerController(params, budget=TrainingBudget(bytes=10**6), sample_elements=0)


def test_make_controller_builds_every_kind(monkeypatch):
    params = [torch.nn.Parameter(torch.zeros(100))]
    assert CONTROLLER_KINDS == ("static", "rules", "planner", "learned")
    assert isinstance(make_controller("static", params, choices=LayerChoice("q8")), StaticController)
    assert isinstance(make_controller("rules", params, every=5), AccordionController)
    assert isinstance(make_controller("accordion", params), AccordionController)
    planner = make_controller("planner", params, budget=TrainingBudget(bytes=10**6), gradients=Quantize(8))
    assert isinstance(planner, PlannerController)
    with pytest.raises(ValueError, match="unknown controller kind 'ppo'"):
        make_controller("ppo", params)
    monkeypatch.setitem(sys.modules, "efficient_optim.compress.learned", None)  # as if it were not installed
    with pytest.raises(ValueError, match="'learned' needs efficient_optim.compress.learned"):
        make_controller("learned", params)
