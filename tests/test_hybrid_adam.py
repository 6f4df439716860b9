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
