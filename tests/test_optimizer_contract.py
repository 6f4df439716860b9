"""The generic optimizer contract, held over every optimizer of the library.

The same kinds of checks as PyTorch's optimizer contract tests (test/test_optim.py), written for our
optimizers: hooks (step, state-dict and load-state-dict, including a pre-hook that returns a new dict),
deepcopy/pickle, atomic ``add_param_group``, tensor learning rates, schedulers that write lr/betas between
steps, non-contiguous / 0-d / empty / float64 / bf16 / fp16 parameters, checkpoints whose ``step`` is a plain
number, and ``state_dict()`` after ``load_state_dict()`` being the dict that was loaded.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import efficient_optim as eo
from efficient_optim.optim.lowrank_adam import LowRankAdam

# name -> factory(params, **overrides); small thresholds so every codec path runs on small test tensors
OPTIMIZERS = {
    "qadamw32": lambda ps, **kw: eo.QAdamW(ps, **{"lr": 1e-2, "bits": 32, **kw}),
    "qadamw8": lambda ps, **kw: eo.QAdamW(ps, **{"lr": 1e-2, "bits": 8, "min_quantize_numel": 0, **kw}),
    "qadamw4": lambda ps, **kw: eo.QAdamW(ps, **{"lr": 1e-2, "bits": 4, "min_quantize_numel": 0, **kw}),
    "hybrid_adam": lambda ps, **kw: eo.HybridAdam(ps, **{"lr": 1e-2, "min_quantize_numel": 0, **kw}),
    "lowrank_adam": lambda ps, **kw: LowRankAdam(ps, **{"lr": 1e-2, "rank": 2, "min_lowrank_numel": 0, **kw}),
    "adafactor": lambda ps, **kw: eo.Adafactor(ps, **{"lr": 1e-2, "relative_step": False, "scale_parameter": False,
                                                      "min_quantize_numel": 0, **kw}),
    "lion": lambda ps, **kw: eo.Lion(ps, **{"lr": 1e-3, **kw}),
    "lion8": lambda ps, **kw: eo.Lion(ps, **{"lr": 1e-3, "m_bits": 8, "min_quantize_numel": 0, **kw}),
    "sgd": lambda ps, **kw: eo.SGD(ps, **{"lr": 1e-2, "momentum_bits": 32, **kw}),
    "sgd8": lambda ps, **kw: eo.SGD(ps, **{"lr": 1e-2, "momentum_bits": 8, "min_quantize_numel": 0, **kw}),
}
ADAM_FAMILY = ("qadamw32", "qadamw8", "qadamw4", "hybrid_adam", "lowrank_adam")
NAMES = list(OPTIMIZERS)


def _params(seed: int = 0, dtype=torch.float32) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(16, 24), (24,), (8, 8, 4)]
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def _grads(params, step: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed * 1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def _run(opt, params, steps: int, start: int = 0) -> None:
    for k in range(start, start + steps):
        _grads(params, k)
        opt.step()


def _same(a, b) -> None:
    for x, y in zip(a, b):
        assert torch.equal(x.detach(), y.detach())


# --------------------------------------------------------------------------------------------- hooks
@pytest.mark.parametrize("name", NAMES)
def test_step_and_state_dict_hooks_run(name):
    params = _params()
    opt = OPTIMIZERS[name](params)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd_post"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    _run(opt, params, 1)
    opt.load_state_dict(opt.state_dict())
    assert calls == ["pre", "post", "sd_pre", "sd_post", "load_post"]


@pytest.mark.parametrize("name", NAMES)
def test_load_state_dict_pre_hook_result_is_used(name):
    params = _params()
    opt = OPTIMIZERS[name](params)
    _run(opt, params, 2)
    saved = copy.deepcopy(opt.state_dict())

    def hook(optimizer, state_dict):
        new = copy.deepcopy(state_dict)
        new["param_groups"][0]["lr"] = 0.5
        for st in new["state"].values():
            for key, t in st.items():
                if key != "step" and isinstance(t, torch.Tensor) and t.is_floating_point():
                    t.fill_(0.25)
        return new

    fresh = OPTIMIZERS[name](_params())
    fresh.register_load_state_dict_pre_hook(hook)
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["lr"] == 0.5
    floats = [t for st in fresh.state.values() for k, t in st.items() if k != "step" and t.is_floating_point()]
    assert floats and all(bool((t == 0.25).all()) for t in floats)
    # the caller's dict is untouched
    assert saved["param_groups"][0]["lr"] != 0.5


# ------------------------------------------------------------------------------ copies and checkpoints
@pytest.mark.parametrize("name", NAMES)
def test_deepcopy_and_pickle_continue_identically(name):
    params = _params()
    opt = OPTIMIZERS[name](params)
    _run(opt, params, 2)
    clone = copy.deepcopy(opt)
    clone_params = [p for g in clone.param_groups for p in g["params"]]
    pickled = pickle.loads(pickle.dumps(opt))
    pickled_params = [p for g in pickled.param_groups for p in g["params"]]
    for o, ps in ((opt, params), (clone, clone_params), (pickled, pickled_params)):
        _run(o, ps, 2, start=2)
    _same(params, clone_params)
    _same(params, pickled_params)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_after_load_is_the_loaded_dict(name):
    params = _params()
    opt = OPTIMIZERS[name](params)
    _run(opt, params, 2)
    saved = opt.state_dict()
    fresh = OPTIMIZERS[name](_params())
    fresh.load_state_dict(saved)
    again = fresh.state_dict()
    assert again["param_groups"] == saved["param_groups"]
    assert "differentiable" not in again["param_groups"][0] or "differentiable" in saved["param_groups"][0]


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_with_plain_number_step_resumes_exactly(name):
    ref_params = _params()
    ref = OPTIMIZERS[name](ref_params)
    _run(ref, ref_params, 4)

    params = _params()
    opt = OPTIMIZERS[name](params)
    _run(opt, params, 2)
    saved = copy.deepcopy(opt.state_dict())
    for st in saved["state"].values():
        st["step"] = float(st["step"])  # how older optimizers and some tools write it
    buf = io.BytesIO()
    torch.save(saved, buf)
    buf.seek(0)
    resumed = OPTIMIZERS[name](params)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    _run(resumed, params, 2, start=2)
    _same(ref_params, params)


# ------------------------------------------------------------------------------------- param groups
@pytest.mark.parametrize("name", NAMES)
def test_rejected_add_param_group_leaves_optimizer_unchanged(name):
    params = _params()
    opt = OPTIMIZERS[name](params[:2])
    before = len(opt.param_groups)
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [params[2]], "lr": -1.0})
    assert len(opt.param_groups) == before
    ref_params = _params()
    ref = OPTIMIZERS[name](ref_params[:2])
    _grads(params, 0)
    _grads(ref_params, 0)
    opt.step()
    ref.step()
    _same(params, ref_params)  # the third parameter (never accepted) did not move either
    assert torch.equal(params[2].detach(), _params()[2].detach())


@pytest.mark.parametrize("name", NAMES)
def test_tensor_lr_equals_float_lr_and_follows_a_scheduler(name):
    lr = OPTIMIZERS[name]([torch.nn.Parameter(torch.zeros(1))]).defaults["lr"]
    runs = []
    for as_tensor in (False, True):
        params = _params()
        opt = OPTIMIZERS[name](params, lr=torch.tensor(lr) if as_tensor else lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        for k in range(5):
            _grads(params, k)
            opt.step()
            sched.step()
        runs.append(params)
        assert float(opt.param_groups[0]["lr"]) == pytest.approx(lr * 0.25)
        assert isinstance(opt.param_groups[0]["lr"], torch.Tensor) == as_tensor
    for a, b in zip(*runs):  # a float32 tensor lr rounds the schedule's values: equal to float precision
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ADAM_FAMILY)
def test_scheduler_writing_lr_and_betas_equals_writing_them_by_hand(name):
    params = _params()
    opt = OPTIMIZERS[name](params)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=6, cycle_momentum=True)
    written = []
    for k in range(5):
        written.append((opt.param_groups[0]["lr"], opt.param_groups[0]["betas"]))
        _grads(params, k)
        opt.step()
        sched.step()
    assert len({b for _, b in written}) > 1  # the scheduler did change beta1
    hand_params = _params()
    hand = OPTIMIZERS[name](hand_params)
    for k, (lr, betas) in enumerate(written):
        hand.param_groups[0]["lr"], hand.param_groups[0]["betas"] = lr, betas
        _grads(hand_params, k)
        hand.step()
    _same(params, hand_params)


@pytest.mark.parametrize("name", NAMES)
def test_maximize_equals_descending_the_negated_gradient(name):
    up, down = _params(), _params()
    opt_up = OPTIMIZERS[name](up, maximize=True)
    opt_down = OPTIMIZERS[name](down)
    for k in range(3):
        _grads(up, k)
        _grads(down, k)
        for p in down:
            p.grad.neg_()
        opt_up.step()
        opt_down.step()
    _same(up, down)


@pytest.mark.parametrize("name", ADAM_FAMILY)
def test_amsgrad_is_refused_by_name(name):
    with pytest.raises(ValueError, match="amsgrad"):
        OPTIMIZERS[name](_params(), amsgrad=True)


# -------------------------------------------------------------------------------- parameter kinds
@pytest.mark.parametrize("name", NAMES)
def test_strided_parameter_steps_like_a_contiguous_one(name):
    torch.manual_seed(0)
    w0 = torch.randn(64, 96)
    strided = torch.nn.Parameter(torch.stack([w0, w0], -1)[..., 0])  # a view with strides (192, 2)
    plain = torch.nn.Parameter(w0.clone())
    assert not strided.is_contiguous()
    opts = [OPTIMIZERS[name]([strided]), OPTIMIZERS[name]([plain])]
    for k in range(3):
        g = torch.Generator().manual_seed(k)
        grad = torch.randn(64, 96, generator=g)
        strided.grad, plain.grad = grad.clone(), grad.clone()
        for o in opts:
            o.step()
    torch.testing.assert_close(strided.detach(), plain.detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_zero_dim_and_empty_parameters(name):
    scalar = torch.nn.Parameter(torch.tensor(1.5))
    empty = torch.nn.Parameter(torch.zeros(0, 4))
    opt = OPTIMIZERS[name]([scalar, empty])
    for _ in range(2):
        scalar.grad, empty.grad = torch.tensor(0.5), torch.zeros(0, 4)
        opt.step()
    assert scalar.item() < 1.5 and empty.shape == (0, 4)


@pytest.mark.parametrize("name", NAMES)
def test_float64_parameters_keep_their_precision(name):
    p = torch.nn.Parameter(torch.full((16, 24), 1 + 1e-12, dtype=torch.float64))
    opt = OPTIMIZERS[name]([p], weight_decay=0.0)
    for _ in range(3):
        p.grad = torch.zeros_like(p)
        opt.step()
    assert p.dtype == torch.float64
    assert bool((p == 1 + 1e-12).all())  # a zero-gradient step must not round to float32


def test_float64_qadamw32_matches_torch_adamw_in_float64():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(32, 16, dtype=torch.float64))
    b = torch.nn.Parameter(a.detach().clone())
    ours, ref = eo.QAdamW([a], lr=1e-3, bits=32), torch.optim.AdamW([b], lr=1e-3, weight_decay=1e-2)
    for k in range(5):
        g = torch.randn(32, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(k)) * 1e-3
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert ours.state[a]["exp_avg"].dtype == torch.float64
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_step(name, dtype):
    params = _params(dtype=dtype)
    before = [p.detach().clone() for p in params]
    opt = OPTIMIZERS[name](params)
    _run(opt, params, 3)
    for p, b in zip(params, before):
        assert p.dtype == dtype and bool(torch.isfinite(p).all())
        assert not torch.equal(p.detach(), b)


@pytest.mark.parametrize("name", ["qadamw8", "sgd"])
def test_nonfinite_gradient_warning_points_at_the_callers_line(name):
    params = _params()
    opt = OPTIMIZERS[name](params)
    _grads(params, 0)
    params[0].grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="NaN or Inf") as record:
        opt.step()
    assert record[0].filename == __file__
