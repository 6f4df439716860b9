"""QAdamW: parity with torch AdamW at 32 bits, tracking at 16/8/4 bits, checkpoints, edge cases, errors."""

import copy
import io

import pytest
import torch

from efficient_optim import QAdamW, state_bytes

FUSED_MODES = [False, None]  # reference path, and the kernel when it is available


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 4)
    )


def batches(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(32, 4, generator=g)
    for _ in range(n):
        x = torch.randn(64, 32, generator=g)
        yield x, torch.tanh(x @ w) + 0.1 * torch.randn(64, 4, generator=g)


def train(model, opt, steps: int, seed: int = 1, sched=None) -> float:
    loss = None
    for x, y in batches(steps, seed):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
    return loss.item()


def test_bits32_matches_torch_adamw_with_groups_and_weight_decay():
    a, b = tiny_model(), tiny_model()
    groups = lambda m: [  # noqa: E731
        {"params": [p for n, p in m.named_parameters() if p.ndim > 1], "weight_decay": 0.1},
        {"params": [p for n, p in m.named_parameters() if p.ndim <= 1], "weight_decay": 0.0, "lr": 3e-3},
    ]
    ref = torch.optim.AdamW(groups(a), lr=1e-3, betas=(0.8, 0.99), eps=1e-7)
    ours = QAdamW(groups(b), lr=1e-3, betas=(0.8, 0.99), eps=1e-7, bits=32)
    train(a, ref, 50)
    train(b, ours, 50)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", FUSED_MODES)
@pytest.mark.parametrize("bits,rel_bound", [(16, 0.02), (8, 0.03), (4, 0.15)])
def test_low_bit_runs_track_the_fp32_reference(bits, rel_bound, fused):
    """Final loss after 150 steps stays within the stated relative bound of fp32 AdamW's."""
    ref_model, q_model = tiny_model(), tiny_model()
    ref = train(ref_model, torch.optim.AdamW(ref_model.parameters(), lr=2e-3), 150)
    ours = train(q_model, QAdamW(q_model.parameters(), lr=2e-3, bits=bits, min_quantize_numel=0, fused=fused), 150)
    assert abs(ours - ref) / ref < rel_bound, (ours, ref)


@pytest.mark.parametrize("fused", FUSED_MODES)
@pytest.mark.parametrize("kw", [{"bits": 8}, {"bits": 4, "rounding": "stochastic"}, {"bits": 16, "rounding": "stochastic"}, {"m_bits": 4, "v_bits": 8, "v_block_size": 128}])
def test_checkpoint_resume_is_bit_identical(kw, fused):
    full_model = tiny_model()
    full = QAdamW(full_model.parameters(), lr=2e-3, min_quantize_numel=0, fused=fused, **kw)
    train(full_model, full, 40)

    model = tiny_model()
    opt = QAdamW(model.parameters(), lr=2e-3, min_quantize_numel=0, fused=fused, **kw)
    data = list(batches(40))
    for x, y in data[:25]:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    resumed_model = tiny_model(seed=5)
    resumed_model.load_state_dict(ckpt["model"])
    resumed = QAdamW(resumed_model.parameters(), lr=2e-3, min_quantize_numel=0, fused=fused, **kw)
    resumed.load_state_dict(ckpt["opt"])
    for x, y in data[25:]:
        resumed.zero_grad()
        torch.nn.functional.mse_loss(resumed_model(x), y).backward()
        resumed.step()
    for pa, pb in zip(full_model.parameters(), resumed_model.parameters()):
        assert torch.equal(pa, pb)


def test_load_keeps_code_and_scale_dtypes_with_bf16_params():
    p = torch.nn.Parameter(torch.randn(64, 128, dtype=torch.bfloat16))
    opt = QAdamW([p], bits=8, scale_dtype="float32")
    p.grad = torch.randn_like(p)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    opt2 = QAdamW([p], bits=8, scale_dtype="float32")
    opt2.load_state_dict(sd)
    st = opt2.state[p]
    assert st["exp_avg.codes"].dtype == torch.uint8
    assert st["exp_avg.scales"].dtype == torch.float32  # kept as saved, not cast to the bf16 param dtype
    assert torch.equal(st["exp_avg.scales"], sd["state"][0]["exp_avg.scales"])


def test_mismatched_checkpoints_raise_naming_the_parameter():
    a = torch.nn.Parameter(torch.randn(64, 128))
    opt = QAdamW([a], bits=8)
    a.grad = torch.randn_like(a)
    opt.step()
    sd = opt.state_dict()
    b = torch.nn.Parameter(torch.randn(64, 100))
    with pytest.raises(ValueError, match="parameter #0"):
        QAdamW([b], bits=8).load_state_dict(copy.deepcopy(sd))
    # hyperparameters come from the checkpoint (torch semantics); states that contradict them are refused
    edited = copy.deepcopy(sd)
    edited["param_groups"][0]["bits"] = 32
    with pytest.raises(ValueError, match="other settings"):
        QAdamW([torch.nn.Parameter(a.detach().clone())], bits=8).load_state_dict(edited)
    edited["param_groups"][0]["bits"] = 4  # the recorded plan (8-bit codecs) contradicts bits=4
    with pytest.raises(ValueError, match=r"parameter #0 .*Quantized\(bits=8.*other settings"):
        QAdamW([torch.nn.Parameter(a.detach().clone())], bits=8).load_state_dict(edited)


def test_checkpoint_missing_a_newer_hyperparameter_loads_with_its_default():
    p = torch.nn.Parameter(torch.randn(64, 128))
    opt = QAdamW([p], bits=8)
    p.grad = torch.randn_like(p)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    del sd["param_groups"][0]["scale_dtype"]
    del sd["param_groups"][0]["nonfinite"]
    opt2 = QAdamW([p], bits=8)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["scale_dtype"] == "bfloat16"
    opt2.step()


def test_per_group_overrides_pick_codecs_per_group():
    big1 = torch.nn.Parameter(torch.randn(128, 128))
    big2 = torch.nn.Parameter(torch.randn(128, 128))
    small = torch.nn.Parameter(torch.randn(100))
    opt = QAdamW([{"params": [big1]}, {"params": [big2], "bits": 4}, {"params": [small]}], bits=8)
    for p in (big1, big2, small):
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[big1]["exp_avg.codes"].numel() == 128 * 128
    assert opt.state[big2]["exp_avg.codes"].numel() == 128 * 128 // 2
    assert opt.state[small]["exp_avg"].dtype == torch.float32  # under min_quantize_numel: dense


def test_lr_scheduler_and_closure_work():
    model = tiny_model()
    opt = QAdamW(model.parameters(), lr=1e-2, bits=8)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    train(model, opt, 12, sched=sched)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.25)
    x, y = next(batches(1, seed=9))

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    assert isinstance(opt.step(closure), torch.Tensor)


def test_none_grads_zero_size_and_noncontiguous_grads():
    a = torch.nn.Parameter(torch.randn(96, 64))
    b = torch.nn.Parameter(torch.randn(0, 5))
    c = torch.nn.Parameter(torch.randn(200, 50))  # gets a transposed (non-contiguous) gradient
    d = torch.nn.Parameter(torch.randn(10))  # never gets a gradient
    opt = QAdamW([a, b, c, d], bits=8, min_quantize_numel=0)
    ref_c = torch.nn.Parameter(c.detach().clone())
    ref = QAdamW([ref_c], bits=8, min_quantize_numel=0)
    for _ in range(3):
        a.grad = torch.randn_like(a)
        b.grad = torch.randn_like(b)
        gt = torch.randn(50, 200)
        c.grad = gt.t()
        assert not c.grad.is_contiguous()
        ref_c.grad = gt.t().contiguous()
        opt.step()
        ref.step()
    assert d not in opt.state
    assert b.numel() == 0 and torch.isfinite(a).all()
    assert torch.equal(c, ref_c)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"lr": -1.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"betas": (1.0, 0.999)}, "beta1"),
        ({"betas": (0.9, -0.1)}, "beta2"),
        ({"betas": 0.9}, "betas"),
        ({"eps": 0.0}, "eps"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"bits": 6}, "bits"),
        ({"m_bits": 2}, "m_bits"),
        ({"v_map": "cubic"}, "v_map"),
        ({"m_block_size": 1}, "m_block_size"),
        ({"bits": 4, "v_block_size": 33}, "v_block_size"),
        ({"rounding": "down"}, "rounding"),
        ({"v_rounding": "down"}, "v_rounding"),
        ({"scale_dtype": "float16"}, "scale_dtype"),
        ({"min_quantize_numel": -1}, "min_quantize_numel"),
        ({"seed": -3}, "seed"),
        ({"nonfinite": "ignore"}, "nonfinite"),
        ({"fused": "yes"}, "fused"),
    ],
)
def test_invalid_hyperparameters_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        QAdamW([torch.nn.Parameter(torch.randn(10))], **kwargs)


def test_invalid_group_override_is_rejected_too():
    with pytest.raises(ValueError, match="bits"):
        QAdamW([{"params": [torch.nn.Parameter(torch.randn(4))], "bits": 3}])


def test_sparse_gradients_get_a_clear_error():
    emb = torch.nn.Embedding(100, 16, sparse=True)
    opt = QAdamW(emb.parameters())
    emb(torch.tensor([1, 2, 3])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


@pytest.mark.parametrize("fused", FUSED_MODES)
def test_nonfinite_gradient_skips_the_whole_step_by_default(fused):
    a = torch.nn.Parameter(torch.randn(128, 64))
    b = torch.nn.Parameter(torch.randn(64, 64))
    opt = QAdamW([a, b], bits=8, fused=fused)
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    opt.step()
    before = copy.deepcopy((a.detach().clone(), b.detach().clone(), opt.state_dict()))
    a.grad = torch.randn_like(a)
    b.grad = torch.randn_like(b)
    b.grad[3, 7] = float("nan")
    with pytest.warns(RuntimeWarning, match="step skipped"):
        opt.step()
    assert opt.skipped_steps == 1
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])
    after = opt.state_dict()["state"]
    for idx, st in before[2]["state"].items():
        for key, t in st.items():
            assert torch.equal(after[idx][key], t), key
    b.grad[3, 7] = 0.0
    opt.step()  # training goes on
    assert opt.state[a]["step"].item() == 2


def test_nonfinite_gradient_can_raise_instead():
    a = torch.nn.Parameter(torch.randn(128, 64))
    opt = QAdamW([a], nonfinite="raise")
    a.grad = torch.full_like(a, float("inf"))
    with pytest.raises(FloatingPointError, match="parameter #0"):
        opt.step()
    assert not opt.state[a]


def test_min_quantize_numel_counts_the_whole_parameter():
    p = torch.nn.Parameter(torch.randn(64, 64))  # 4096 elements: quantized by default
    q = torch.nn.Parameter(torch.randn(63, 64))  # 4032: stays dense
    opt = QAdamW([p, q], bits=8)
    p.grad, q.grad = torch.randn_like(p), torch.randn_like(q)
    opt.step()
    assert "exp_avg.codes" in opt.state[p] and "exp_avg" in opt.state[q]


def test_bf16_parameters_train():
    model = tiny_model().to(torch.bfloat16)
    opt = QAdamW(model.parameters(), lr=2e-3, bits=8, min_quantize_numel=0)
    first = None
    for x, y in batches(60):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x.bfloat16()).float(), y)
        loss.backward()
        opt.step()
        first = first or float(loss)
    assert float(loss) < 0.7 * first


def test_state_bytes_of_qadamw_is_exact():
    w = torch.nn.Parameter(torch.randn(256, 1000))  # 256,000 elements: 1000 blocks of 256, 2000 of 128
    bias = torch.nn.Parameter(torch.randn(1000))
    for bits, codes, blocks in ((8, 256_000, 1000), (4, 128_000, 2000)):
        opt = QAdamW([w, bias], bits=bits)
        w.grad, bias.grad = torch.randn_like(w), torch.randn_like(bias)
        opt.step()
        shared = sum(t.numel() * t.element_size() for t in opt.shared_state_tensors().values())
        expected = 2 * (codes + blocks * 2) + 2 * 1000 * 4 + 2 * 4 + shared  # bf16 scales  # codes+scales, dense bias, steps
        assert state_bytes(opt) == expected


def test_defaults_resolve_as_documented():
    p = torch.nn.Parameter(torch.randn(64, 128))
    group8 = QAdamW([p]).param_groups[0]
    group4 = QAdamW([p], bits=4).param_groups[0]
    c8, c4 = QAdamW([p]).codecs(p, group8), QAdamW([p], bits=4).codecs(p, group4)
    assert (c8["exp_avg"].qmap.name, c8["exp_avg"].rounding, c8["exp_avg_sq"].qmap.name) == ("dynamic", "nearest", "dynamic_nozero")
    assert (c4["exp_avg"].rounding, c4["exp_avg_sq"].qmap.name, c4["exp_avg_sq"].rounding) == (
        "stochastic", "sqrt_nozero", "nearest"
    )
    assert c4["exp_avg"].block_size == 128 and c8["exp_avg"].block_size == 256
    assert c8["exp_avg"].scale_dtype == "bfloat16"
