"""A controller under gradient release: it observes each gradient before compression and its per-layer
decisions set the compressor of that layer's next gradient; a run with it resumes exactly."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

import efficient_optim as eo
from efficient_optim.compress import (
    AccordionController,
    ControllerPolicy,
    ErrorFeedback,
    LayerChoice,
    Quantize,
    StaticController,
)

STEPS = 8


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 80), torch.nn.GELU(), torch.nn.Linear(80, 64), torch.nn.GELU(),
                               torch.nn.Linear(64, 4))  # fmt: skip


def batches(n: int = STEPS):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 32, generator=g), torch.randn(8, 4, generator=g)) for _ in range(n)]


DATA = batches()


def levels_per_block(grad: torch.Tensor, block: int = 128) -> int:
    """The most distinct values any block of ``block`` consecutive entries of ``grad`` holds."""
    flat = grad.reshape(-1)
    return max(int(torch.unique(flat[i:i + block]).numel()) for i in range(0, flat.numel(), block))


def test_a_decision_sets_the_compressor_of_that_layers_next_gradient():
    model = make_model()
    params = list(model.parameters())
    opt = eo.AdamW(params, lr=1e-3, policy=ControllerPolicy())
    ctl = StaticController(params, {0: LayerChoice("q2"), 2: LayerChoice("q8")}, gradients=ErrorFeedback(Quantize(4)),
                           optimizer=opt, every=100)  # fmt: skip
    handle = eo.enable_gradient_release(model, opt, controller=ctl)
    assert handle.compressor is ctl.gradients and handle.observer == ctl.observe
    handed, now = {}, {"step": 0}  # per step, the gradient each parameter was stepped with
    step_param, position = opt.step_param, {id(p): k for k, p in enumerate(params)}

    def recording_step_param(param):
        handed.setdefault(now["step"], {})[position[id(param)]] = param.grad.clone()
        step_param(param)

    opt.step_param = recording_step_param
    twin = make_model()  # the raw gradients of step 0 (the parameters are the same then)
    F.mse_loss(twin(DATA[0][0]), DATA[0][1]).backward()
    for step in range(3):
        x, y = DATA[step]
        now["step"] = step
        F.mse_loss(model(x), y).backward()
        ctl.step(step, total_steps=STEPS)
    # the observer saw the raw gradient, before compression
    assert all(ctl.norms[k][0] == pytest.approx(float(p.grad.norm()), rel=1e-6) for k, p in enumerate(twin.parameters()))
    assert all(len(ctl.norms[k]) == 3 for k in range(len(params)))
    # step 0: every layer at the hook's 4 bits; after the decision layer 0 gets 2 bits, layer 2 8 bits
    assert max(levels_per_block(g) for g in handed[0].values()) <= 16
    assert levels_per_block(handed[1][0]) <= 4 < levels_per_block(handed[0][0])
    assert levels_per_block(handed[1][2]) > 16 >= levels_per_block(handed[1][4])
    assert [handle.compressor.compressor_for(k).describe() for k in range(len(params))] == ["q2", "q4", "q8", "q4", "q4", "q4"]
    assert ctl.gradients.resets == 0  # the residual is kept across the change


def run_released(steps, ckpt_at=None, resume=None):
    model = make_model()
    params = list(model.parameters())
    opt = eo.AdamW(params, lr=1e-3, policy=ControllerPolicy())
    ctl = AccordionController(params, low=LayerChoice("q2", "4bit"), high=LayerChoice("q8", "8bit"), warmup_steps=2,
                              gradients=ErrorFeedback(Quantize(4)), optimizer=opt, every=2, window=2)  # fmt: skip
    handle = eo.enable_gradient_release(model, opt, controller=ctl)
    start, saved = 0, None
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["opt"])
        handle.load_state_dict(resume["release"])
        ctl.load_state_dict(resume["ctl"])
        start = resume["step"]
    for step in range(start, steps):
        if step == ckpt_at:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "release": handle.state_dict(),
                        "ctl": ctl.state_dict(), "step": step}, buf)  # fmt: skip
            buf.seek(0)
            saved = torch.load(buf, weights_only=True)
        x, y = DATA[step]
        loss = F.mse_loss(model(x), y)
        loss.backward()
        ctl.step(step, total_steps=steps, loss=loss.item())
    return torch.cat([p.detach().reshape(-1) for p in params]), ctl.history, saved


def test_a_released_run_with_a_controller_resumes_exactly():
    ref, history, saved = run_released(STEPS, ckpt_at=3)
    assert {tuple(c) for h in history for c in h["choices"].values()} == {("q8", "8bit"), ("q2", "4bit")}  # both used
    resumed, resumed_history, _ = run_released(STEPS, resume=saved)
    assert torch.equal(resumed, ref) and resumed_history == history


def test_bad_use_is_refused():
    model = make_model()
    params = list(model.parameters())
    ctl = StaticController(params, LayerChoice("q8"), gradients=ErrorFeedback(Quantize(4)))
    opt = eo.AdamW(params, lr=1e-3)
    with pytest.raises(ValueError, match="not both"):
        eo.enable_gradient_release(model, opt, observer=print, controller=ctl)
    with pytest.raises(ValueError, match="gradients compressor"):
        eo.enable_gradient_release(model, opt, compressor=ErrorFeedback(Quantize(4)), controller=ctl)
    with pytest.raises(ValueError, match="in order"):
        eo.enable_gradient_release(model, opt, controller=StaticController(params[::-1], LayerChoice("q8")))
    with pytest.raises(ValueError, match="Controller"):
        eo.enable_gradient_release(model, opt, controller="rules")
    with pytest.raises(ValueError, match="callable"):
        eo.enable_gradient_release(model, opt, observer="print")
    assert opt._release is None  # nothing was left enabled by a refused call
