"""TrainingBudget: exact training bytes of a controller's choices and the projection that makes a budget hard."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_compress_controller import DATA, make_model  # the same small model and batches

import efficient_optim as eo
from efficient_optim.compress import (
    GRAD_SPECS,
    MOMENTUM_SPECS,
    ControllerPolicy,
    ErrorFeedback,
    GradAccumulator,
    GradientCompressor,
    LayerChoice,
    NoFeedback,
    Quantize,
    StaticController,
    TrainingBudget,
)
from efficient_optim.profiling.state_bytes import state_breakdown


def momentum_state_bytes(opt):
    return sum(r["nbytes"] for r in state_breakdown(opt) if r["key"].split(".")[0] == "exp_avg")


def test_training_bytes_equal_what_the_library_measures():
    model = make_model()
    params = list(model.parameters())
    opt = eo.AdamW(params, lr=1e-3, policy=ControllerPolicy())
    choices = {0: LayerChoice("q2", "4bit"), 2: LayerChoice("top10%/q8", "8bit"), 4: LayerChoice("bf16", "bf16")}
    ctl = StaticController(params, choices, gradients=ErrorFeedback(Quantize(8)), optimizer=opt, every=100)
    acc = GradAccumulator(params, ctl.gradients, observer=ctl.observe)
    budget = TrainingBudget(bytes=10**9)
    predicted = budget.breakdown(choices, ctl)  # before anything is applied: the bytes the choices will take
    for step in range(2):
        for x, y in DATA[2 * step:2 * step + 2]:
            (F.mse_loss(model(x), y) / 2).backward()
        acc.step(opt)
        ctl.step(step)
    measured = eo.training_bytes(model, opt, accumulator=acc)
    now = budget.breakdown({}, ctl)
    assert now == predicted
    assert now["grad"] == measured["grad_buffers"]  # compressed buffers + 8-bit residuals
    assert now["momentum"] == momentum_state_bytes(opt)
    assert now["params"] == measured["params"] and now["controller"] == ctl.nbytes() > 0
    assert now["total"] == sum(now[k] for k in ("grad", "momentum", "params", "controller"))
    assert ctl.history[0]["training_bytes"] == now["total"]


def test_projection_fits_lowers_the_least_sensitive_layer_first_and_refuses_an_impossible_budget():
    params = [torch.nn.Parameter(torch.zeros(4096)) for _ in range(3)]
    opt = eo.AdamW(params, lr=1e-3, policy=ControllerPolicy())
    ctl = StaticController(params, {}, gradients=ErrorFeedback(Quantize(8)), optimizer=opt)
    top = {k: LayerChoice("fp32", "fp32") for k in range(3)}
    full = TrainingBudget(bytes=10**9).training_bytes(top, ctl)
    budget = TrainingBudget(bytes=full - 20000)
    out = budget.project(top, ctl, sensitivity={0: 0.2, 1: 0.5, 2: 0.3})
    assert budget.training_bytes(out, ctl) <= budget.limit(ctl)
    assert out[1] == top[1] and out[0] != top[0]  # the most sensitive layer is untouched
    assert TrainingBudget(bytes=full).project(top, ctl) == top  # within the budget: unchanged
    floor = budget.minimum_bytes(ctl, top)
    with pytest.raises(ValueError, match=f"limit of {floor - 1} bytes.*at least {floor} bytes"):
        TrainingBudget(bytes=floor - 1).project(top, ctl)
    with pytest.raises(ValueError, match="cannot hold"):
        StaticController(params, {}, gradients=ErrorFeedback(Quantize(8)), optimizer=opt, budget=TrainingBudget(bytes=10))
    for bad in [{}, {"bytes": 1, "bytes_per_param": 1}, {"bytes": -1}, {"bytes_per_param": True}]:
        with pytest.raises(ValueError, match="TrainingBudget"):
            TrainingBudget(**bad)
    with pytest.raises(ValueError, match="TrainingBudget"):
        StaticController(params, {}, budget=1000)


choice_strategy = st.builds(LayerChoice, st.sampled_from(GRAD_SPECS + ("rand10%", None)),
                            st.sampled_from(MOMENTUM_SPECS + (None,)))  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.integers(1, 20000), min_size=1, max_size=5), feedback=st.booleans(),
       with_optimizer=st.booleans(), data=st.data())  # fmt: skip
def test_projected_choices_never_exceed_the_budget(sizes, feedback, with_optimizer, data):
    params = [torch.nn.Parameter(torch.zeros(n)) for n in sizes]
    opt = eo.AdamW(params, lr=1e-3, policy=ControllerPolicy()) if with_optimizer else None
    grads = ErrorFeedback(Quantize(8)) if feedback else NoFeedback(Quantize(32))
    ctl = StaticController(params, {}, gradients=grads, optimizer=opt)
    choices = data.draw(st.dictionaries(st.integers(0, len(sizes) - 1), choice_strategy))
    sensitivity = data.draw(st.none() | st.fixed_dictionaries({k: st.floats(0, 1) for k in range(len(sizes))}))
    unlimited = TrainingBudget(bytes=10**12)
    floor, asked = unlimited.minimum_bytes(ctl, choices), unlimited.training_bytes(choices, ctl)
    case = data.draw(st.sampled_from(["infeasible", "projected", "within"]))
    if case == "infeasible":
        limit = data.draw(st.integers(1, floor - 1))
    elif case == "projected" and asked > floor:
        limit = data.draw(st.integers(floor, asked - 1))
    else:
        limit = data.draw(st.integers(asked, asked + 1000))
    budget = TrainingBudget(bytes=limit)
    event("infeasible" if floor > limit else "within" if asked <= limit else "projected")
    if floor > limit:
        with pytest.raises(ValueError, match="cannot hold"):
            budget.project(choices, ctl, sensitivity)
        return
    out = budget.project(choices, ctl, sensitivity)
    assert budget.training_bytes(out, ctl) <= limit
    if asked <= limit:
        assert out == choices


def test_a_controller_with_a_budget_never_exceeds_it():
    model = make_model()
    params = list(model.parameters())
    opt = eo.AdamW(params, lr=1e-3, policy=ControllerPolicy())
    precise = {k: LayerChoice("fp32", "fp32") for k in range(len(params))}
    numel = sum(p.numel() for p in params)
    budget = TrainingBudget(bytes_per_param=7.0)  # fp32 params (4) + 3 B for gradient, residual and momentum
    ctl = StaticController(params, precise, gradients=ErrorFeedback(Quantize(8)), optimizer=opt, every=2, budget=budget)
    acc = GradAccumulator(params, ctl.gradients, observer=ctl.observe)
    for step in range(4):
        for x, y in DATA[2 * step:2 * step + 2]:
            (F.mse_loss(model(x), y) / 2).backward()
        acc.step(opt)  # the optimizer applies the momentum plans requested at the last decision first
        if step:  # from the first decision on, what is really held fits
            measured = eo.training_bytes(model, opt, accumulator=acc)
            real = measured["grad_buffers"] + momentum_state_bytes(opt) + measured["params"] + ctl.nbytes()
            assert real <= budget.limit(ctl) == int(7.0 * numel)
        ctl.step(step)
    assert all(h["training_bytes"] <= budget.limit(ctl) for h in ctl.history)
    assert ctl.current[0] != precise[0]  # the largest layers were lowered


class KeepsItsOwnState(GradientCompressor):
    """A compressor whose per-layer state the budget cannot size."""

    def compressor_for(self, key):
        return Quantize(8)

    def _compress(self, key, flat, salt):
        return Quantize(8).compress(flat, salt=salt)


def test_a_compressor_the_budget_cannot_size_is_named_and_loss_is_checked():
    params = [torch.nn.Parameter(torch.zeros(100))]
    ctl = StaticController(params, LayerChoice("q4"), gradients=KeepsItsOwnState())
    ctl.step(0, loss=torch.tensor(2.0))  # a one-element tensor is a loss too
    assert ctl.history[0]["training_bytes"] is None and ctl.tracker.last_loss == 2.0  # not sized, no error
    with pytest.raises(ValueError, match="cannot size the state of KeepsItsOwnState"):
        StaticController(params, {}, gradients=KeepsItsOwnState(), budget=TrainingBudget(bytes=10**6))
    with pytest.raises(ValueError, match="loss must be a number"):
        ctl.step(1, loss="low")
