"""Split master weights (bf16 + correction bits, Kahan, stochastic rounding), gradient release, training_bytes."""

import io

import pytest
import torch

import efficient_optim as eo
from efficient_optim.optim.master_weights import decode_correction, encode_correction, round_stochastic, ulp


def grads(steps, shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(steps)]


def track(correction_bits=None, weight_rounding="nearest", steps=200, lr=1e-4):
    """Same gradients into an fp32 parameter and a bf16 one; returns (fp32 reference, bf16 param, optimizer)."""
    torch.manual_seed(0)
    w0 = torch.randn(64, 96).to(torch.bfloat16).float()  # representable in bf16: both start equal
    ref = torch.nn.Parameter(w0.clone())
    low = torch.nn.Parameter(w0.to(torch.bfloat16))
    o_ref = eo.QAdamW([ref], lr=lr, bits=32, weight_decay=0.0)
    o_low = eo.QAdamW([low], lr=lr, bits=32, weight_decay=0.0, correction_bits=correction_bits, weight_rounding=weight_rounding)
    for g in grads(steps, w0.shape):
        g = g.to(torch.bfloat16)  # the same gradient values for both
        ref.grad, low.grad = g.float(), g
        o_ref.step()
        o_low.step()
    return ref.detach(), low, o_low


def test_correction_codes_round_trip_within_their_resolution():
    w = torch.randn(10_000) * torch.logspace(-6, 3, 10_000)
    low = w.to(torch.bfloat16)
    for bits in (8, 16):
        back = decode_correction(encode_correction(w, low, bits), low, bits)
        assert ((back - w).abs() <= ulp(low) / (2**bits - 2) * 0.5 + w.abs() * 2**-24).all()


def test_stochastic_rounding_of_weights_is_unbiased_and_reproducible():
    x = torch.full((400_000,), 1.0 + 2**-10)  # a quarter of the way between two bf16 values
    r = round_stochastic(x, torch.bfloat16, salt=7)
    assert set(r.float().unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert r.float().mean().item() == pytest.approx(1.0 + 2**-10, abs=2e-5)
    assert torch.equal(r, round_stochastic(x, torch.bfloat16, salt=7))


def test_sixteen_correction_bits_follow_the_fp32_trajectory():
    # the bound: each step stores the residual to half of ulp(bf16)/65534 (~2**-25 of the weight, a quarter of
    # an fp32 ulp), so after n steps the master weight is within n such half-steps of fp32 training
    ref, low, opt = track(correction_bits=16)
    master = decode_correction(opt.state[low]["weight_correction"], low.detach(), 16)
    assert ((master - ref).abs() <= 200 * ulp(low.detach()) / (2 * 65534)).all()
    assert (master - ref).norm() / ref.norm() < 1e-6
    assert opt.state[low]["weight_correction"].dtype == torch.int16


def test_eight_correction_bits_drift_less_than_the_stated_bound_and_far_less_than_plain_bf16():
    ref, low, opt = track(correction_bits=8)
    master = decode_correction(opt.state[low]["weight_correction"], low.detach(), 8)
    bound = 200 * ulp(low.detach()) / (2 * 254)  # <= half a code step lost per step
    assert ((master - ref).abs() <= bound).all()
    plain_ref, plain, _ = track()
    err8 = (master - ref).norm() / ref.norm()
    err_plain = (plain.detach().float() - plain_ref).norm() / plain_ref.norm()
    assert err8 < err_plain / 10  # measured: 1.0e-4 vs 1.4e-3


@pytest.mark.parametrize("mode", ["kahan", "stochastic"])
def test_kahan_and_stochastic_rounding_keep_updates_that_nearest_rounding_loses(mode):
    # updates of ~lr = 1e-4 are ~1/80 of a bf16 ulp near 1: round-to-nearest drops nearly all of them
    torch.manual_seed(0)
    w0 = torch.randn(64, 96).to(torch.bfloat16).float()

    def captured(weights, ref):  # share of the fp32 reference's movement that the weights made
        moved = ref - w0
        return float(((weights - w0) * moved).sum() / moved.pow(2).sum())

    ref, low, opt = track(weight_rounding=mode)
    weights = low.detach().float() + (opt.state[low]["weight_kahan"].float() if mode == "kahan" else 0)
    plain_ref, plain, _ = track()
    assert captured(plain.detach().float(), plain_ref) < 0.2
    assert captured(weights, ref) == pytest.approx(1.0, abs=0.05 if mode == "stochastic" else 1e-3)


def test_fp32_parameters_ignore_master_weight_settings():
    p = torch.nn.Parameter(torch.randn(8, 8))
    opt = eo.QAdamW([p], correction_bits=16, bits=32)
    p.grad = torch.randn(8, 8)
    opt.step()
    assert "weight_correction" not in opt.state[p]


@pytest.mark.parametrize("name", ["qadamw4", "lion8", "hybrid_adam"])
def test_default_weight_rounding_is_stochastic_for_bf16_and_nearest_with_corrections(name):
    """weight_rounding="auto" (the default): bf16 parameters without correction bits are rounded
    stochastically (bit-identical to asking for it), with correction bits the residual is stored as with
    "nearest"; fp32 parameters are untouched by the setting."""

    def run(dtype, **kw):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(64, 96).to(dtype))
        opt = eo.create_optimizer(name, [p], lr=1e-4, **kw)
        for g in grads(20, p.shape):
            p.grad = g.to(dtype)
            opt.step()
        return p.detach().clone(), opt

    auto, _ = run(torch.bfloat16)
    stochastic, _ = run(torch.bfloat16, weight_rounding="stochastic")
    nearest, _ = run(torch.bfloat16, weight_rounding="nearest")
    assert torch.equal(auto, stochastic) and not torch.equal(auto, nearest)
    corrected, opt = run(torch.bfloat16, correction_bits=16)
    explicit, _ = run(torch.bfloat16, correction_bits=16, weight_rounding="nearest")
    assert torch.equal(corrected, explicit) and "weight_correction" in opt.state[opt.param_groups[0]["params"][0]]
    f_auto, _ = run(torch.float32)
    f_nearest, _ = run(torch.float32, weight_rounding="nearest")
    assert torch.equal(f_auto, f_nearest)


@pytest.mark.parametrize("kw,message", [({"correction_bits": 4}, "correction_bits"),
                                        ({"weight_rounding": "up"}, "weight_rounding"),
                                        ({"correction_bits": 8, "weight_rounding": "kahan"}, "nearest")])  # fmt: skip
def test_invalid_master_weight_settings_are_rejected(kw, message):
    with pytest.raises(ValueError, match=message):
        eo.QAdamW([torch.nn.Parameter(torch.zeros(2))], **kw)


def test_checkpoints_with_corrections_load_weights_only_and_resume_exactly():
    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 8)).to(torch.bfloat16)
        return model, eo.QAdamW(model.parameters(), lr=1e-3, bits=4, min_quantize_numel=0, correction_bits=8)

    def train(model, opt, batches):
        for x in batches:
            opt.zero_grad()
            model(x).float().pow(2).mean().backward()
            opt.step()

    batches = [torch.randn(16, 64, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    m1, o1 = make()
    train(m1, o1, batches)
    m2, o2 = make()
    train(m2, o2, batches[:4])
    buf = io.BytesIO()
    torch.save({"model": m2.state_dict(), "opt": o2.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    m3, o3 = make()
    m3.load_state_dict(ckpt["model"])
    o3.load_state_dict(ckpt["opt"])
    assert o3.state[next(m3.parameters())]["weight_correction"].dtype == torch.int8
    train(m3, o3, batches[4:])
    for a, b in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kw", [{"bits": 8}, {"bits": 4}, {"bits": 32}, {"bits": 32, "correction_bits": 16}])
def test_gradient_release_gives_the_same_result_as_a_normal_step(kw):
    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))
        if kw.get("correction_bits"):
            model = model.to(torch.bfloat16)
        return model, eo.QAdamW(model.parameters(), lr=1e-3, min_quantize_numel=0, **kw)

    xs = [torch.randn(8, 64, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    normal, o1 = make()
    for x in xs:
        o1.zero_grad()
        normal(x.to(normal[0].weight.dtype)).float().pow(2).mean().backward()
        o1.step()
    released, o2 = make()
    handle = eo.enable_gradient_release(released, o2)
    for x in xs:
        released(x.to(released[0].weight.dtype)).float().pow(2).mean().backward()
        assert all(p.grad is None for p in released.parameters())
    with pytest.raises(RuntimeError, match="gradient release is on"):
        o2.step()
    assert eo.training_bytes(released, o2)["grads"] == max(p.numel() * p.element_size() for p in released.parameters())
    handle.remove()
    o2.step()  # normal steps work again (no gradients: nothing happens)
    for a, b in zip(normal.parameters(), released.parameters()):
        assert torch.equal(a, b)


def test_gradient_release_refuses_optimizers_that_cannot_step_one_parameter():
    model = torch.nn.Linear(4, 4)
    with pytest.raises(TypeError, match="efficient_optim"):
        eo.enable_gradient_release(model, torch.optim.AdamW(model.parameters()))
    with pytest.raises(ValueError, match="not handled"):
        eo.enable_gradient_release(model, eo.QAdamW([model.weight]))


def test_training_bytes_match_tensors_counted_directly():
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 16)).to(torch.bfloat16)
    opt = eo.QAdamW(model.parameters(), bits=8, correction_bits=8)
    model(torch.randn(4, 256, dtype=torch.bfloat16)).float().sum().backward()
    opt.step()
    tb = eo.training_bytes(model, opt)
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    assert tb["params"] == 2 * n and tb["grads"] == 2 * n
    assert tb["corrections"] == n  # int8 per parameter
    direct_states = sum(t.numel() * t.element_size() for p in params for k, t in opt.state[p].items() if k != "weight_correction")
    shared = sum(t.numel() * t.element_size() for t in opt.shared_state_tensors().values())
    assert tb["states"] == direct_states + shared
    assert tb["total"] == tb["params"] + tb["grads"] + tb["states"] + tb["corrections"]
    assert tb["per_param"] == pytest.approx(tb["total"] / n)
