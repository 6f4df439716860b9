"""Adafactor, Lion and SGD-momentum rules against their references; quantized-state variants stay close."""

import copy

import pytest
import torch

import efficient_optim as eo


def train(model, opt, steps=15, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 32, generator=gen)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def models():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.Tanh(), torch.nn.Linear(128, 64))
    return m, copy.deepcopy(m)


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("kw", [{}, {"beta1": 0.9, "weight_decay": 0.01}, {"warmup_init": True},
                                {"lr": 1e-3, "relative_step": False, "scale_parameter": False}])  # fmt: skip
def test_adafactor_matches_transformers(kw):
    from transformers.optimization import Adafactor as HFAdafactor

    a, b = models()
    train(a, eo.Adafactor(a.parameters(), **kw))
    train(b, HFAdafactor(b.parameters(), **kw))
    assert max_diff(a, b) < 1e-6


@pytest.mark.parametrize("kw", [{}, {"beta1": 0.9, "weight_decay": 0.01, "m_bits": 8, "min_quantize_numel": 0},
                                {"lr": 1e-2, "relative_step": False, "clip_threshold": 0.05}])  # fmt: skip
def test_adafactor_factored_space_step_equals_the_generic_decode_encode_path(kw, monkeypatch):
    """Plain >= 2-D parameters take a step computed on the row/column statistics; the generic rule loop
    (dense decode, rule, encode) is what sharded parameters use. Both must give the same numbers, 3-D
    tensors, quantized first moments and update clipping included."""
    from efficient_optim.optim import adafactor as module
    from efficient_optim.state.factored import Factored

    torch.manual_seed(0)
    params = [torch.randn(24, 40), torch.randn(6, 8, 10), torch.randn(40)]
    fast = [torch.nn.Parameter(t.clone()) for t in params]
    slow = [torch.nn.Parameter(t.clone()) for t in params]
    opt_fast, opt_slow = eo.Adafactor(fast, **kw), eo.Adafactor(slow, **kw)
    calls = []
    real = module.Adafactor._factored_step
    monkeypatch.setattr(module.Adafactor, "_factored_step", lambda self, *a: (calls.append(1), real(self, *a)))
    generic_codecs = opt_slow.codecs
    other = Factored()  # equal to the module's codec but not the same object: the generic path runs
    opt_slow.codecs = lambda p, g: {**generic_codecs(p, g), "exp_avg_sq": other}
    gen = torch.Generator().manual_seed(1)
    for _ in range(12):
        for a, b in zip(fast, slow):
            a.grad = torch.randn(a.shape, generator=gen) * 3
            b.grad = a.grad.clone()
        n = len(calls)
        opt_fast.step()
        assert len(calls) == n + 2  # the two matrices took the factored-space step
        opt_slow.step()
        assert len(calls) == n + 2  # and the generic path did not
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    st_f, st_s = opt_fast.state[fast[1]], opt_slow.state[slow[1]]
    torch.testing.assert_close(st_f["exp_avg_sq.row"], st_s["exp_avg_sq.row"], rtol=1e-5, atol=0)


def test_lion_matches_the_reference_formula():
    a, b = models()
    train(a, eo.Lion(a.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1))
    ms = [torch.zeros_like(p) for p in b.parameters()]
    gen = torch.Generator().manual_seed(0)
    for _ in range(15):
        x = torch.randn(16, 32, generator=gen)
        b.zero_grad()
        b(x).pow(2).mean().backward()
        with torch.no_grad():
            for p, m in zip(b.parameters(), ms):
                p.mul_(1 - 1e-3 * 0.1)
                p.add_(torch.sign(0.9 * m + 0.1 * p.grad), alpha=-1e-3)
                m.mul_(0.99).add_(p.grad, alpha=0.01)
    assert max_diff(a, b) < 1e-6


@pytest.mark.parametrize("kw", [{}, {"nesterov": True}, {"weight_decay": 0.01, "dampening": 0.1}])
def test_sgd_with_fp32_momentum_matches_torch(kw):
    a, b = models()
    train(a, eo.SGD(a.parameters(), lr=0.05, momentum=0.9, momentum_bits=32, **kw))
    train(b, torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9, **kw))
    assert max_diff(a, b) < 1e-6


@pytest.mark.parametrize("name", ["lion8", "sgd8"])
def test_eight_bit_momentum_stays_close_to_fp32(name):
    ref_name = {"lion8": "lion", "sgd8": None}[name]
    a, b = models()
    opt = eo.create_optimizer(name, a, lr=1e-3 if ref_name else 0.05, min_quantize_numel=0)
    ref = eo.create_optimizer(ref_name, b, lr=1e-3) if ref_name else eo.SGD(b.parameters(), lr=0.05, momentum_bits=32)
    train(a, opt)
    train(b, ref)
    assert max_diff(a, b) < 5e-3
    weight = next(a.parameters())
    state = opt.state[weight]
    assert any(k.endswith(".codes") for k in state)
    per_param = sum(t.numel() * t.element_size() for k, t in state.items() if k != "step") / weight.numel()
    assert per_param < 1.05  # one byte per element plus bf16 block scales


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: eo.Lion(p, lr=-1), "lr"),
        (lambda p: eo.Lion(p, betas=(0.9, 1.5)), "beta"),
        (lambda p: eo.Lion(p, m_bits=5), "m_bits"),
        (lambda p: eo.SGD(p, momentum=0.0), "momentum"),
        (lambda p: eo.SGD(p, nesterov=True, dampening=0.5), "nesterov"),
        (lambda p: eo.Adafactor(p, lr=1e-3), "relative_step"),
        (lambda p: eo.Adafactor(p, decay_rate=0.5), "decay_rate"),
        (lambda p: eo.Adafactor(p, eps=1e-3), "eps"),
    ],
)
def test_invalid_hyperparameters_are_named(make, message):
    with pytest.raises(ValueError, match=message):
        make([torch.nn.Parameter(torch.zeros(4, 4))])


def test_adafactor_momentum_at_8_bits_stays_close_to_fp32_momentum():
    a, b = models()
    opt = eo.Adafactor(a.parameters(), beta1=0.9, m_bits=8, min_quantize_numel=0)
    train(a, opt)
    train(b, eo.Adafactor(b.parameters(), beta1=0.9))
    assert max_diff(a, b) < 2e-3
    w = next(a.parameters())
    assert {"exp_avg.codes", "exp_avg_sq.row", "exp_avg_sq.col"} <= set(opt.state[w])


@pytest.mark.parametrize("make", [
    lambda p: eo.Adafactor(p),  # relative step, parameter scale
    lambda p: eo.Adafactor(p, beta1=0.9, m_bits=4, rounding="stochastic", warmup_init=True, min_quantize_numel=0),
    lambda p: eo.Lion(p, lr=1e-3, m_bits=4, rounding="stochastic", min_quantize_numel=0),
    lambda p: eo.SGD(p, lr=0.05, nesterov=True, momentum_bits=16, rounding="stochastic", min_quantize_numel=0),
])  # fmt: skip
def test_weights_only_checkpoints_resume_bit_identically(make):
    import io

    a, b = models()
    c = copy.deepcopy(b)
    oa, ob = make(a.parameters()), make(b.parameters())
    train(a, oa, steps=6)
    train(b, ob, steps=3)
    buf = io.BytesIO()
    torch.save({"model": b.state_dict(), "opt": ob.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    c.load_state_dict(ckpt["model"])
    oc = make(c.parameters())
    oc.load_state_dict(ckpt["opt"])
    gen = torch.Generator().manual_seed(0)
    for i in range(6):  # the same data stream as train(): the first three batches were seen before the save
        x = torch.randn(16, 32, generator=gen)
        if i < 3:
            continue
        oc.zero_grad()
        c(x).pow(2).mean().backward()
        oc.step()
    for p, q in zip(a.parameters(), c.parameters()):
        assert torch.equal(p, q)
