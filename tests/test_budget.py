"""Adaptive precision under a hard budget: the budget is never exceeded (after every step and between the
transcodes of a re-plan), infeasible budgets are refused before training, the knapsack is within its stated
gap of the optimum, hysteresis counts and limits transitions, and plans resume bit-identically."""

from __future__ import annotations

import io
import itertools
import random

import pytest
import torch

import efficient_optim as eo
from efficient_optim.policy import Budget
from efficient_optim.policy.allocators import Item, fixed_allocation, knapsack_allocation


def _model(seed=0):
    torch.manual_seed(seed)
    # large enough that the 8-bit maps' shared tables (~33 KB each) are a small part of the budget
    return torch.nn.Sequential(torch.nn.Embedding(1024, 128), torch.nn.Linear(128, 256), torch.nn.Tanh(),
                               torch.nn.Linear(256, 128))  # fmt: skip


def _step(model, opt, i):
    x = torch.randint(0, 1024, (8, 12), generator=torch.Generator().manual_seed(i))
    out = model(x)
    loss = (out - out.detach().roll(1, dims=-1)).square().mean() + out.mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


@pytest.mark.parametrize("allocator", ["fixed", "data", "dynamic"])
def test_the_budget_is_never_exceeded(allocator):
    model = _model()
    policy = Budget(bytes_per_param=1.2, allocator=allocator, warmup=2, every=3, patience=1)
    opt = eo.QAdamW(model.named_parameters(), policy=policy)
    seen = []
    original = opt.set_plan

    def watched(param, specs):  # between the transcodes of one re-plan
        original(param, specs)
        seen.append(eo.state_bytes(opt))

    opt.set_plan = watched
    for i in range(14):
        _step(model, opt, i)
        seen.append(eo.state_bytes(opt))
    n = sum(p.numel() for p in model.parameters())
    assert max(seen) <= policy.limit == int(1.2 * n)
    assert policy.planned_bytes() <= policy.limit
    if allocator != "fixed":
        assert policy.errors, "the warm-up measured the candidates' errors"
        stats = policy.grad_stats[0]  # the embedding's gradient: mostly zero rows, heavy-tailed
        assert stats["rms"] > 0 and stats["kurtosis"] > 3
        assert 0.1 <= policy.sensitivity(0) <= 10


def test_an_infeasible_budget_is_refused_naming_the_smallest_one():
    with pytest.raises(ValueError, match=r"cheapest plan needs \d+ bytes"):
        eo.QAdamW(_model().named_parameters(), policy=Budget(bytes=10_000))
    with pytest.raises(ValueError, match="exactly one"):
        Budget(bytes=10, bytes_per_param=1.0)
    with pytest.raises(ValueError, match="allocator"):
        Budget(bytes=10, allocator="greedy")


def test_a_larger_budget_buys_precision_and_plain_parameters_work():
    def plan(bpp):
        model = _model()
        opt = eo.QAdamW(model.parameters(), policy=Budget(bytes_per_param=bpp, allocator="fixed"))
        _step(model, opt, 0)
        return [opt.plan_of(p) for p in model.parameters()], eo.state_bytes(opt)

    small, small_bytes = plan(0.8)
    large, large_bytes = plan(6.0)
    assert small_bytes < large_bytes
    assert small[0]["exp_avg"] != large[0]["exp_avg"]  # the embedding (first in the fixed rule) got more bits


def test_the_knapsack_is_within_its_gap_of_the_optimum():
    rng = random.Random(0)
    for _ in range(30):
        items = []
        for k in range(4):
            nb = sorted(rng.sample(range(10, 200), 3))
            err = sorted((rng.random() * 10 for _ in range(3)), reverse=True)
            items.append(Item((k, "m"), ["a", "b", "c"], nb, err))
        budget = sum(it.nbytes[0] for it in items) + rng.randint(0, 300)
        choice, gap = knapsack_allocation(items, budget)
        used = sum(it.nbytes[choice[it.key]] for it in items)
        got = sum(it.error[choice[it.key]] for it in items)
        best = min(sum(it.error[i] for it, i in zip(items, pick))
                   for pick in itertools.product(range(3), repeat=4)
                   if sum(it.nbytes[i] for it, i in zip(items, pick)) <= budget)  # fmt: skip
        assert used <= budget
        assert best - 1e-9 <= got <= best + gap + 1e-9
        fixed, _ = fixed_allocation(items, budget)
        assert sum(it.nbytes[fixed[it.key]] for it in items) <= budget


def test_hysteresis_limits_and_counts_transitions():
    def run(patience):
        model = _model()
        policy = Budget(bytes_per_param=1.2, allocator="dynamic", warmup=1, every=1, patience=patience)
        opt = eo.QAdamW(model.named_parameters(), policy=policy)
        flip = itertools.cycle([0.0, 1.0])
        original = policy.observe

        def noisy(optimizer, index, param, group, values, grad=None):  # errors that alternate between two rankings
            original(optimizer, index, param, group, values, grad=grad)
            f = next(flip)
            for key, stats in policy.errors.items():
                if key[0] == 1:
                    stats.update({"4bit": 0.9 * f, "8bit": 0.5 * f})

        policy.observe = noisy
        for i in range(10):
            _step(model, opt, i)
        return policy.transitions

    eager, patient = run(1), run(3)
    assert eager > patient
    assert patient >= 0


def test_plans_and_statistics_resume_bit_identically():
    def make(model):
        return eo.QAdamW(model.named_parameters(), policy=Budget(bytes_per_param=1.2, allocator="dynamic",
                                                                 warmup=2, every=3, patience=1))  # fmt: skip

    a = _model()
    oa = make(a)
    for i in range(12):
        _step(a, oa, i)
    b = _model()
    ob = make(b)
    for i in range(5):
        _step(b, ob, i)
    buf = io.BytesIO()
    torch.save({"model": b.state_dict(), "opt": ob.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    c = _model()
    c.load_state_dict(ckpt["model"])
    oc = make(c)
    oc.load_state_dict(ckpt["opt"])
    assert oc.policy.state_dict() == ob.policy.state_dict()
    for i in range(5, 12):
        _step(c, oc, i)
    for p, q in zip(a.parameters(), c.parameters()):
        assert torch.equal(p, q)
    assert oc.policy.transitions == oa.policy.transitions
    assert [oc.plan_of(p) for p in c.parameters()] == [oa.plan_of(p) for p in a.parameters()]


def test_budget_on_other_optimizers():
    for make in (lambda ps: eo.Lion(ps, m_bits=32, policy=Budget(bytes_per_param=0.8, allocator="data", warmup=1)),
                 lambda ps: eo.HybridAdam(ps, policy=Budget(bytes_per_param=1.0, allocator="data", warmup=1))):  # fmt: skip
        model = _model()
        opt = make(model.named_parameters())
        for i in range(4):
            _step(model, opt, i)
        assert eo.state_bytes(opt) <= opt.policy.limit


def test_budget_with_gradient_release_replans_and_stays_within_budget():
    model = _model()
    policy = Budget(bytes_per_param=1.2, allocator="dynamic", warmup=2, every=2, patience=1)
    opt = eo.QAdamW(model.named_parameters(), policy=policy)
    handle = eo.enable_gradient_release(model, opt)
    for i in range(8):
        x = torch.randint(0, 1024, (8, 12), generator=torch.Generator().manual_seed(i))
        out = model(x)
        ((out - out.detach().roll(1, dims=-1)).square().mean() + out.mean()).backward()
        assert eo.state_bytes(opt) <= policy.limit
    handle.remove()
    assert policy.steps == 8 and policy.errors  # one re-plan call per backward; statistics were measured


def test_weight_correction_bytes_count_against_the_budget():
    model = _model().to(torch.bfloat16)
    policy = Budget(bytes_per_param=3.0, allocator="data", warmup=1)
    opt = eo.QAdamW(model.named_parameters(), correction_bits=16, policy=policy)
    for i in range(3):
        _step(model, opt, i)
    n = sum(p.numel() for p in model.parameters())
    assert eo.state_bytes(opt) <= policy.limit
    assert policy.fixed_bytes >= 2 * n  # the 16-bit corrections of every bf16 weight
    with pytest.raises(ValueError, match="cheapest plan"):
        eo.QAdamW(_model().to(torch.bfloat16).named_parameters(), correction_bits=16,
                  policy=Budget(bytes_per_param=1.5))  # fmt: skip
