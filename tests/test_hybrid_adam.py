"""HybridAdam: dense codecs equal AdamW, factored v follows the reference formula, memory, errors."""

import copy

import pytest
import torch

import efficient_optim as eo


def test_dense_codecs_equal_torch_adamw():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 8))
    b = copy.deepcopy(a)
    oa = eo.HybridAdam(a.parameters(), lr=1e-3, weight_decay=0.1, m_codec="fp32", v_codec="fp32")
    ob = torch.optim.AdamW(b.parameters(), lr=1e-3, weight_decay=0.1)
    for i in range(10):
        x = torch.randn(8, 64, generator=torch.Generator().manual_seed(i))
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_factored_v_follows_adamw_with_adafactor_statistics():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 96))
    ref = p.detach().clone()
    opt = eo.HybridAdam([p], lr=1e-2, weight_decay=0.0, m_codec="fp32", v_codec="factored", min_quantize_numel=0)
    m, row, col = torch.zeros(64, 96), torch.zeros(64), torch.zeros(96)
    b1, b2, eps = 0.9, 0.999, 1e-8
    for t in range(1, 6):
        g = torch.randn(64, 96, generator=torch.Generator().manual_seed(t))
        p.grad = g.clone()
        opt.step()
        v_prev = torch.outer(row, col) / row.mean().clamp_min(1e-30)
        v = b2 * v_prev + (1 - b2) * g * g  # the dense moment the AdamW rule sees this step
        m = b1 * m + (1 - b1) * g
        ref -= 1e-2 / (1 - b1**t) * m / (v.sqrt() / (1 - b2**t) ** 0.5 + eps)
        row, col = v.mean(-1), v.mean(-2)  # what the codec keeps of it
    assert torch.allclose(p.detach(), ref, atol=1e-5)
    assert torch.allclose(opt.state[p]["exp_avg_sq.row"], row, rtol=1e-5)


def test_default_state_is_under_0_6_bytes_per_parameter_on_a_large_matrix():
    p = torch.nn.Parameter(torch.randn(2048, 2048))
    opt = eo.HybridAdam([p])
    p.grad = torch.randn(2048, 2048)
    opt.step()
    per_param = sum(t.numel() * t.element_size() for t in opt.state[p].values()) / p.numel()
    assert per_param < 0.53  # 4-bit m (0.5 + bf16 scales per 128) + row/column means
    assert eo.bytes_per_param(opt) < 0.6  # including the shared quantization tables


@pytest.mark.parametrize("kw,message", [({"m_codec": "factored"}, "m_codec"), ({"v_codec": "2bit"}, "v_codec"),
                                        ({"bits": 4}, "bits"), ({"m_bits": 8}, "m_bits")])  # fmt: skip
def test_invalid_codec_choices_are_named(kw, message):
    with pytest.raises(ValueError, match=message):
        eo.HybridAdam([torch.nn.Parameter(torch.zeros(64, 128))], min_quantize_numel=0, **kw)


def _train(model, opt, steps, start=0):
    for i in range(start, start + steps):
        x = torch.randn(8, 64, generator=torch.Generator().manual_seed(i))
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))


def test_defaults_resolve_to_4bit_stochastic_m_and_factored_v_with_small_tensors_dense():
    net = _net()
    opt = eo.HybridAdam(net.parameters())
    m, v = opt.describe_codecs(net[0].weight).values()
    assert isinstance(m, eo.state.Quantized) and (m.bits, m.block_size, m.rounding, m.qmap.name) == (
        4, 128, "stochastic", "dynamic")  # fmt: skip
    assert isinstance(v, eo.state.Factored)
    assert all(c.is_dense_fp32 for c in opt.describe_codecs(net[0].bias).values())  # 1-D: fp32


def test_codec_instances_and_per_group_choices_checkpoint_weights_only_and_resume_exactly():
    import io

    from efficient_optim.state import Quantized

    def make(net):
        return eo.HybridAdam([{"params": [net[0].weight], "m_codec": Quantized(8, 64, rounding="stochastic")},
                              {"params": [net[2].weight], "m_codec": "bf16", "v_codec": "4bit"},
                              {"params": [net[0].bias, net[2].bias]}], lr=1e-2, min_quantize_numel=0)  # fmt: skip

    a, b = _net(), _net()
    oa, ob = make(a), make(b)
    _train(a, oa, 6)
    _train(b, ob, 3)
    buf = io.BytesIO()
    torch.save({"model": b.state_dict(), "opt": ob.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    c = _net()
    oc = make(c)
    c.load_state_dict(ckpt["model"])
    oc.load_state_dict(ckpt["opt"])
    # the instance is kept as plain data in the group; the codec it rebuilds is equal to it
    assert oc.param_groups[0]["m_codec"]["codec"] == "Quantized"
    assert oc.describe_codecs(c[0].weight)["exp_avg"] == Quantized(8, 64, rounding="stochastic")
    _train(c, oc, 3, start=3)
    for p, q in zip(a.parameters(), c.parameters()):
        assert torch.equal(p, q)
    # an optimizer built without the instance rebuilds it from the checkpoint and continues identically
    d = _net()
    d.load_state_dict(ckpt["model"])
    plain = eo.HybridAdam([{"params": [d[0].weight]}, {"params": [d[2].weight], "m_codec": "bf16", "v_codec": "4bit"},
                           {"params": [d[0].bias, d[2].bias]}], lr=1e-2, min_quantize_numel=0)  # fmt: skip
    plain.load_state_dict(ckpt["opt"])
    _train(d, plain, 3, start=3)
    for p, q in zip(a.parameters(), d.parameters()):
        assert torch.equal(p, q)


def test_per_group_codec_choices_are_validated_too():
    with pytest.raises(ValueError, match="v_codec"):
        eo.HybridAdam([{"params": [torch.nn.Parameter(torch.zeros(64, 128))], "v_codec": "3bit"}])
    with pytest.raises(ValueError, match="rank"):
        eo.HybridAdam([torch.nn.Parameter(torch.zeros(64, 128))], rank=0)


@pytest.mark.parametrize("m_codec,v_codec,bound", [("bf16", "8bit", 0.03), ("8bit", "8bit", 0.05),
                                                    ("4bit", "4bit", 0.4), ("8bit", "factored", 0.4),
                                                    ("4bit", "factored", 0.45)])  # fmt: skip
def test_compressed_combinations_track_adamw(m_codec, v_codec, bound):
    a, b, start = _net(), _net(), _net()
    _train(a, eo.HybridAdam(a.parameters(), lr=1e-3, m_codec=m_codec, v_codec=v_codec, min_quantize_numel=0), 10)
    _train(b, torch.optim.AdamW(b.parameters(), lr=1e-3), 10)
    da = torch.cat([(p - s).detach().flatten() for p, s in zip(a.parameters(), start.parameters())])
    db = torch.cat([(p - s).detach().flatten() for p, s in zip(b.parameters(), start.parameters())])
    # measured after 10 steps: 0.005 / 0.016 (bf16 / 8-bit moments), 0.24 (factored v alone), 0.28, 0.34
    assert (da - db).norm() < bound * db.norm()


def test_lowrank_codecs_plug_in_when_the_module_exists():
    pytest.importorskip("efficient_optim.state.lowrank")
    net = _net()
    opt = eo.HybridAdam(net.parameters(), m_codec="lowrank", v_codec="lowrank", rank=4, min_quantize_numel=0)
    _train(net, opt, 3)
    m, v = opt.describe_codecs(net[0].weight).values()
    assert type(m).__name__ == "LowRank" and m.refresh == "online" and v.nonnegative
    assert "exp_avg.u" in opt.state[net[0].weight] and all(torch.isfinite(p).all() for p in net.parameters())


@pytest.mark.parametrize("m_codec", ["4bit", "8bit"])
def test_fused_factored_kernel_matches_the_reference_path(m_codec):
    from efficient_optim.kernels.cpu import load_cpu_kernels

    if load_cpu_kernels() is None:
        pytest.skip("the CPU kernel could not be built here")
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(96, 256) * 0.02) for _ in range(2)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    kw = dict(lr=1e-2, weight_decay=0.1, m_codec=m_codec, min_quantize_numel=0)
    fused, plain = eo.HybridAdam(params, **kw), eo.HybridAdam(ref, fused=False, **kw)
    for t in range(1, 6):
        for p, q in zip(params, ref):
            g = torch.randn(96, 256, generator=torch.Generator().manual_seed(t)) * 1e-2
            p.grad, q.grad = g.clone(), g.clone()
        fused.step()
        plain.step()
        if t == 1:  # one step: only the means' summation order differs
            s, r = fused.state[params[0]], plain.state[ref[0]]
            assert torch.allclose(s["exp_avg_sq.row"], r["exp_avg_sq.row"], rtol=1e-6)
            assert torch.allclose(s["exp_avg_sq.col"], r["exp_avg_sq.col"], rtol=1e-6)
            assert (s["exp_avg.codes"] != r["exp_avg.codes"]).float().mean() < 1e-3
    for p, q in zip(params, ref):
        assert torch.allclose(p, q, atol=1e-5, rtol=0)
        assert torch.allclose(fused.state[p]["exp_avg_sq.col"], plain.state[q]["exp_avg_sq.col"], rtol=1e-4)
