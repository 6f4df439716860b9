"""Policies and plans: per-parameter specs by name, plans resolved once, transcoding mid-run (with a checkpoint
taken between transitions resuming bit-identically), plans recorded in checkpoints, and the one AdamW that the
presets are (bit-identical to QAdamW / HybridAdam / torch's AdamW)."""

from __future__ import annotations

import copy
import io
import sys
from pathlib import Path

import pytest
import torch

import efficient_optim as eo
from efficient_optim.policy import ByName, Policy, Schedule
from efficient_optim.state import Dense, Factored

GOLDEN = Path(__file__).parent / "golden" / "checkpoints"


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 64))


def _train(model, opt, steps, start=0):
    for i in range(start, start + steps):
        gen = torch.Generator().manual_seed(i)
        x = torch.randn(16, 64, generator=gen)
        loss = (model(x) - x.roll(1, dims=1)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_by_name_overrides_specs_per_parameter():
    model = _model()
    opt = eo.QAdamW(model.named_parameters(), min_quantize_numel=0,
                    policy=ByName({r"^0\.weight$": "fp32", r"^2\.": {"v": "factored"}}, default="4bit"))  # fmt: skip
    _train(model, opt, 2)
    plan = {n: opt.plan_of(p) for n, p in model.named_parameters()}
    assert plan["0.weight"]["exp_avg"] == Dense() and plan["0.weight"]["exp_avg_sq"] == Dense()
    assert plan["0.bias"]["exp_avg"].bits == 4 and plan["0.bias"]["exp_avg_sq"].bits == 4  # the default
    assert plan["2.weight"]["exp_avg"].bits == 8 and plan["2.weight"]["exp_avg_sq"] == Factored()  # m: settings
    assert plan["2.bias"]["exp_avg_sq"] == Dense()  # factored needs a matrix: a vector keeps fp32


def test_by_name_needs_names_and_valid_rules():
    with pytest.raises(ValueError, match="named_parameters"):
        eo.QAdamW(_model().parameters(), policy=ByName({"0": "fp32"}))
    with pytest.raises(ValueError, match="invalid pattern"):
        ByName({"(": "fp32"})
    with pytest.raises(ValueError, match="3bit"):
        ByName({"x": "3bit"})
    with pytest.raises(ValueError, match="policy"):
        eo.QAdamW(_model().parameters(), policy="4bit")


def test_plans_are_resolved_once_and_looked_up():
    model = _model()
    opt = eo.QAdamW(model.parameters(), bits=8)
    _train(model, opt, 1)
    p = model[0].weight
    first = opt.codecs(p, opt.param_groups[0])
    opt.param_groups[0]["bits"] = 4  # settings edited mid-run do not re-plan silently
    assert opt.codecs(p, opt.param_groups[0]) is first
    assert first["exp_avg"].bits == 8


def _param_bytes(opt, p) -> int:
    return sum(t.numel() * t.element_size() for k, t in opt.state[p].items() if k != "step")


def test_set_plan_transcodes_once_and_state_bytes_follows():
    model = _model()
    opt = eo.QAdamW(model.parameters(), bits=8, min_quantize_numel=0)
    _train(model, opt, 3)
    p = model[0].weight
    m_before = opt.plan_of(p)["exp_avg"].decode(opt.state[p], "exp_avg", p).clone()
    total, own = eo.state_bytes(opt), _param_bytes(opt, p)
    assert own == 2 * (p.numel() + 2 * (p.numel() // 256))  # 8-bit codes + bf16 scales, two moments
    opt.set_plan(p, {"exp_avg": "fp32", "exp_avg_sq": "factored"})
    assert torch.equal(opt.state[p]["exp_avg"], m_before)  # decoded once, stored exactly
    assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq.row", "exp_avg_sq.col"}
    assert _param_bytes(opt, p) == 4 * p.numel() + 4 * (p.shape[0] + p.shape[1])
    assert eo.state_bytes(opt) == total - own + _param_bytes(opt, p)  # at once, before any step
    with pytest.raises(ValueError, match="no state"):
        opt.set_plan(p, {"momentum": "fp32"})
    _train(model, opt, 1, start=3)  # and it keeps training


SCHEDULE = {0: "8bit", 2: "4bit", 4: {"m": "4bit", "v": "factored"}, 6: "fp32"}


def test_transitions_mid_run_resume_bit_identically_from_a_checkpoint_between_them():
    def make(model):
        return eo.QAdamW(model.parameters(), lr=1e-2, min_quantize_numel=0, policy=Schedule(SCHEDULE))

    a = _model()
    oa = make(a)
    kinds = []
    for step in range(8):
        _train(a, oa, 1, start=step)
        kinds.append((type(oa.plan_of(a[0].weight)["exp_avg_sq"]).__name__, oa.plan_of(a[0].weight)["exp_avg"]))
    assert [k[0] for k in kinds] == ["Quantized"] * 4 + ["Factored"] * 2 + ["Dense"] * 2
    assert kinds[1][1].bits == 8 and kinds[2][1].bits == 4 and kinds[6][1] == Dense()

    b = _model()
    ob = make(b)
    _train(b, ob, 3)  # 8-bit for two steps, 4-bit for the third: the checkpoint is taken between transitions
    ckpt = _roundtrip({"model": b.state_dict(), "opt": ob.state_dict()})
    assert ckpt["opt"]["policy"] == {"steps": 3, "phase": 1}
    c = _model()
    c.load_state_dict(ckpt["model"])
    oc = make(c)
    oc.load_state_dict(ckpt["opt"])
    assert oc.plan_of(c[0].weight)["exp_avg"].bits == 4
    _train(c, oc, 5, start=3)
    for p, q in zip(a.parameters(), c.parameters()):
        assert torch.equal(p, q)
    assert eo.state_bytes(oc) == eo.state_bytes(oa)


def test_state_bytes_change_at_each_transition():
    model = _model()
    opt = eo.QAdamW(model.parameters(), min_quantize_numel=0, policy=Schedule(SCHEDULE))
    sizes = []
    for step in range(8):
        _train(model, opt, 1, start=step)
        sizes.append(eo.state_bytes(opt))
    assert sizes[0] == sizes[1] > sizes[2] == sizes[3]  # 8-bit -> 4-bit
    assert sizes[3] > sizes[4] == sizes[5]  # factored v
    assert sizes[6] == sizes[7] > sizes[0]  # fp32
    n = sum(p.numel() for p in model.parameters())
    assert sizes[7] == 8 * n + 4 * 4  # two fp32 moments per element, one fp32 step counter per parameter


def test_checkpoints_record_plans_and_refuse_contradicting_settings():
    model = _model()
    opt = eo.QAdamW(model.named_parameters(), policy=ByName({"^0": "4bit"}), min_quantize_numel=0)
    _train(model, opt, 2)
    sd = _roundtrip(opt.state_dict())
    assert sd["codec_plans"][0]["exp_avg"]["codec"] == "Quantized" and sd["codec_plans"][0]["exp_avg"]["bits"] == 4
    assert sd["codec_plans"][2]["exp_avg"]["bits"] == 8
    fresh = eo.QAdamW(_model().named_parameters(), policy=ByName({"^0": "4bit"}), min_quantize_numel=0)
    fresh.load_state_dict(copy.deepcopy(sd))
    plain = eo.QAdamW(_model().named_parameters(), min_quantize_numel=0)  # no policy: 8-bit everywhere
    with pytest.raises(ValueError, match="parameter #0 .*other settings"):
        plain.load_state_dict(copy.deepcopy(sd))


def test_a_checkpoint_from_before_plans_with_bf16_small_states_loads_and_continues():
    ckpt = torch.load(GOLDEN / "legacy_qadamw_bits_16_before_plans.pt", weights_only=True)
    assert "codec_plans" not in ckpt["optimizer"]
    sys.path.insert(0, str(GOLDEN.parent))
    import cases

    params = cases.make_params("float32")
    opt = eo.create_optimizer("qadamw", params, lr=1e-3, bits=16)
    small = [i for i, st in ckpt["optimizer"]["state"].items() if st["exp_avg"].dtype == torch.bfloat16
             and params[i].numel() < 4096]  # fmt: skip
    assert small, "the legacy fixture has bf16 states of small tensors"
    opt.load_state_dict(ckpt["optimizer"])
    for i in small:
        st = opt.state[params[i]]
        assert st["exp_avg"].dtype == torch.float32  # transcoded to today's plan
        assert torch.equal(st["exp_avg"], ckpt["optimizer"]["state"][i]["exp_avg"].float())
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()


def test_adamw_specs_are_the_presets():
    def run(make):
        model = _model()
        opt = make(model)
        _train(model, opt, 4)
        return [p.detach().clone() for p in model.parameters()]

    pairs = [
        (lambda m: eo.AdamW(m.parameters(), m="8bit", v="8bit"), lambda m: eo.QAdamW(m.parameters(), bits=8)),
        (lambda m: eo.AdamW(m.parameters(), m="4bit", v="factored", min_quantize_numel=0),
         lambda m: eo.HybridAdam(m.parameters(), min_quantize_numel=0)),
        (lambda m: eo.AdamW(m.parameters()), lambda m: torch.optim.AdamW(m.parameters(), fused=True)),
    ]  # fmt: skip
    for ours, preset in pairs:
        for x, y in zip(run(ours), run(preset)):
            assert torch.equal(x, y)


def test_adamw_refuses_bad_specs_naming_them():
    p = [torch.nn.Parameter(torch.zeros(64, 64))]
    with pytest.raises(ValueError, match="invalid m: 'factored'"):
        eo.AdamW(p, m="factored")
    with pytest.raises(ValueError, match="invalid v"):
        eo.AdamW(p, v="2bit")


@pytest.mark.parametrize("make", [
    lambda ps: eo.Lion(ps, m_bits=8, min_quantize_numel=0, policy=ByName({r"^0\.": "fp32"})),
    lambda ps: eo.SGD(ps, min_quantize_numel=0, policy=ByName({r"^0\.": "fp32"})),
    lambda ps: eo.LowRankAdam(ps, rank=4, min_lowrank_numel=0, policy=ByName({r"^0\.": "fp32"})),
    lambda ps: eo.HybridAdam(ps, min_quantize_numel=0, policy=ByName({r"^0\.": "fp32"})),
])  # fmt: skip
def test_every_optimizer_takes_a_policy(make):
    model = _model()
    opt = make(model.named_parameters())
    _train(model, opt, 2)
    first = opt.plan_of(model[0].weight)
    assert all(c == Dense() for c in first.values())
    assert any(not isinstance(c, Dense) for c in opt.plan_of(model[2].weight).values())


def test_the_static_policy_is_the_settings():
    a, b = _model(), _model()
    oa = eo.QAdamW(a.parameters(), bits=4, policy=Policy())
    ob = eo.QAdamW(b.parameters(), bits=4)
    _train(a, oa, 3)
    _train(b, ob, 3)
    assert not oa.policy.dynamic and type(ob.policy) is Policy
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_the_documented_policy_example_runs():
    import re

    text = (Path(__file__).resolve().parent.parent / "docs" / "architecture.md").read_text()
    section = text[text.index("## How to add a policy"):text.index("## How to add a protocol")]
    namespace: dict = {}
    exec(compile(re.search(r"```python\n(.*?)```", section, re.S).group(1), "policy_example", "exec"), namespace)
    model, opt = namespace["model"], namespace["opt"]
    model(torch.randn(4, 256)).square().sum().backward()
    opt.step()
    assert opt.plan_of(model[0].weight)["exp_avg"].bits == 8  # 256 columns: the policy's 8 bits
    assert opt.plan_of(model[1].weight)["exp_avg"].bits == 4  # 64 columns: the settings' 4 bits
