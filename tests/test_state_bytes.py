"""state_bytes counts what each optimizer really holds, ours and the anchors'."""

import importlib.util

import pytest
import torch

import efficient_optim as eo


def stepped(name: str, shapes, **kw):
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = eo.create_optimizer(name, params, **kw)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return opt


def test_torch_adamw_is_two_fp32_moments_plus_steps():
    opt = stepped("adamw", [(300, 200), (200,)])
    assert eo.state_bytes(opt) == 2 * 4 * (60_000 + 200) + 2 * 4


def test_breakdown_rows_sum_to_the_total_and_name_parameters():
    model = torch.nn.Linear(256, 64)
    opt = eo.QAdamW(model.parameters(), bits=4)
    model(torch.randn(2, 256)).sum().backward()
    opt.step()
    rows = eo.state_breakdown(opt, model.named_parameters())
    assert sum(r["nbytes"] for r in rows) == eo.state_bytes(opt)
    assert {"weight", "bias", "<shared>"} <= {r["param"] for r in rows}
    assert eo.bytes_per_param(opt) == pytest.approx(eo.state_bytes(opt) / (256 * 64 + 64))


def test_shared_maps_are_counted_once():
    one = stepped("qadamw8", [(64, 128)])
    two = stepped("qadamw8", [(64, 128), (64, 128)])
    per_param = 2 * (64 * 128 + 32 * 2) + 4  # codes + bf16 scales per moment, step
    assert eo.state_bytes(two) - eo.state_bytes(one) == per_param


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_bitsandbytes_state_is_counted_with_its_maps_once():
    opt = stepped("adamw_bnb_8bit", [(256, 256), (256, 256)])
    n = 2 * 65536
    # two uint8 states + fp32 absmax per 256-block for each, plus the two 256-entry fp32 maps (shared)
    lower = 2 * n + 2 * (n // 256) * 4 + 2 * 256 * 4
    assert lower <= eo.state_bytes(opt) <= lower + 64


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao not installed")
def test_torchao_subclass_states_are_opened():
    opt = stepped("adamw_torchao_8bit", [(256, 256)])
    n = 65536
    total = eo.state_bytes(opt)
    assert total < 0.3 * 8 * n  # far below what the fp32-sized subclass pretends to be
    assert total >= 2 * n + 2 * (n // 256) * 4


def test_registry_errors_and_listing():
    assert {"adamw", "qadamw8", "qadamw4"} <= set(eo.list_optimizers())
    with pytest.raises(ValueError, match="unknown optimizer 'adamw9'"):
        eo.create_optimizer("adamw9", [torch.nn.Parameter(torch.randn(3))])
    model = torch.nn.Linear(4, 4)
    assert isinstance(eo.create_optimizer("qadamw4", model, lr=1e-3), eo.QAdamW)
