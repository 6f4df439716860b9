"""P5: the every-K error-corrected codec (ErrorFeedback + a 4-bit residual) and its QAdamW options."""

import copy
import io

import pytest
import torch

from efficient_optim import QAdamW
from efficient_optim.state import Quantized
from efficient_optim.state.corrected import ErrorCorrected


def ema_errors(codec, steps=200, beta=0.9, n=2048, seed=0):
    """Relative error of an EMA stored through ``codec`` against the exact EMA of the same gradients,
    averaged over the second half of a synthetic heavy-tailed gradient sequence."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(n, generator=g))
    mu = 0.3 * torch.randn(n, generator=g)
    state, param = {}, torch.empty(n)
    codec.init(state, "m", param)
    exact = torch.zeros(n)
    errs = []
    for t in range(1, steps + 1):
        grad = scale * (mu + torch.randn(n, generator=g) ** 3)
        exact.mul_(beta).add_(grad, alpha=1 - beta)
        x = beta * codec.decode(state, "m", param) + (1 - beta) * grad
        codec.encode(state, "m", x, salt=t)
        if t > steps // 2:
            errs.append(float((codec.decode(state, "m", param) - exact).norm() / exact.norm()))
    return sum(errs) / len(errs), state


NAIVE_M = Quantized(4, 1024, "linear", True, "nearest", "float32")


def test_correction_reduces_accumulated_error_on_a_synthetic_sequence():
    base, _ = ema_errors(NAIVE_M)  # ~0.72 relative error
    k1, _ = ema_errors(ErrorCorrected(NAIVE_M, "float32", 1, 0.9))  # ~0.41: one rounding error, not an accumulation
    k10, _ = ema_errors(ErrorCorrected(NAIVE_M, "8bit", 10, 0.9))  # ~0.53
    k100, _ = ema_errors(ErrorCorrected(NAIVE_M, "8bit", 100, 0.9))  # ~0.68: the error re-accumulates in ~10 steps
    k1000, _ = ema_errors(ErrorCorrected(NAIVE_M, "8bit", 1000, 0.9))
    assert k1 < 0.65 * base
    assert k1 < k10 < 0.8 * base
    assert k10 < k100 < base
    assert k1000 == pytest.approx(base, rel=1e-6)  # never fires within 200 steps: the inner state is untouched


def test_residual_is_the_accumulated_error_between_corrections():
    """With an exact residual and decay = beta, e_t = m_t - q_t at every step (the module's derivation)."""
    codec = ErrorCorrected(NAIVE_M, "float32", 7, 0.9)
    g = torch.Generator().manual_seed(1)
    n, state, param = 1024, {}, torch.empty(1024)
    codec.init(state, "m", param)
    exact = torch.zeros(n, dtype=torch.float64)
    for t in range(1, 40):
        grad = torch.randn(n, generator=g) ** 3
        exact = 0.9 * exact + 0.1 * grad.double()
        x = 0.9 * codec.decode(state, "m", param) + 0.1 * grad
        codec.encode(state, "m", x, salt=t)
        d = exact - codec.decode(state, "m", param).double()
        e = codec.residual_value(state, "m", param).double()
        assert float((e - d).norm() / d.norm()) < 1e-5


@pytest.mark.parametrize("residual,extra", [("4bit", 0.52), ("8bit", 1.01), ("bfloat16", 2.0), ("float32", 4.0)])
def test_residual_storage_is_compact_and_plain(residual, extra):
    codec = ErrorCorrected(Quantized(4, 128), residual, 10, 0.9)
    p = torch.empty(64, 256)
    state = {}
    codec.init(state, "exp_avg", p)
    assert set(state) == set(codec.expected("exp_avg", p))
    inner = sum(t.numel() * t.element_size() for k, t in state.items() if ".residual" not in k and k != "exp_avg.ef_count")
    res = sum(t.numel() * t.element_size() for k, t in state.items() if ".residual" in k)
    assert inner / p.numel() == pytest.approx(0.5 + 4 / 128, rel=1e-6)
    assert res / p.numel() == pytest.approx(extra, abs=0.02)


def test_invalid_settings_raise():
    with pytest.raises(ValueError, match="correct_every"):
        ErrorCorrected(NAIVE_M, "4bit", 0)
    with pytest.raises(ValueError, match="residual"):
        ErrorCorrected(NAIVE_M, "2bit", 10, 0.9)
    with pytest.raises(ValueError, match="decay"):
        ErrorCorrected(NAIVE_M, "8bit", 10, 1.5)
    with pytest.raises(ValueError, match="m_correct_every"):
        QAdamW([torch.nn.Parameter(torch.zeros(4))], m_correct_every=0)
    with pytest.raises(ValueError, match="ec_residual"):
        QAdamW([torch.nn.Parameter(torch.zeros(4))], ec_residual="3bit")


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 64))


def _steps(m, opt, start, stop):
    for t in range(start, stop):
        x = torch.randn(16, 64, generator=torch.Generator().manual_seed(t))
        loss = (m(x) - x.flip(1)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def test_qadamw_option_wraps_moments_and_resumes_exactly():
    kw = dict(lr=1e-3, bits=4, m_correct_every=3, v_correct_every=5, ec_residual="8bit", min_quantize_numel=0)
    m1 = _model()
    o1 = QAdamW(m1.parameters(), **kw)
    codecs = o1.codecs(m1[0].weight, o1.param_groups[0])
    assert isinstance(codecs["exp_avg"], ErrorCorrected) and codecs["exp_avg"].correct_every == 3 and codecs["exp_avg"].decay == 0.9
    assert codecs["exp_avg_sq"].correct_every == 5 and codecs["exp_avg_sq"].decay == 0.999
    full = _steps(m1, o1, 0, 12)
    m2 = _model()
    o2 = QAdamW(m2.parameters(), **kw)
    _steps(m2, o2, 0, 7)
    buf = io.BytesIO()
    torch.save({"model": m2.state_dict(), "opt": o2.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    m3 = _model()
    m3.load_state_dict(ck["model"])
    o3 = QAdamW(m3.parameters(), **kw)
    o3.load_state_dict(ck["opt"])
    assert o3.state[m3[0].weight]["exp_avg.ef_count"].dtype == torch.int64
    assert _steps(m3, o3, 7, 12) == full
    for a, b in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(a, b)


def test_dense_fp32_states_are_not_wrapped():
    o = QAdamW([torch.nn.Parameter(torch.zeros(10))], bits=4, m_correct_every=10)  # small: fp32 moments
    codecs = o.codecs(o.param_groups[0]["params"][0], o.param_groups[0])
    assert not isinstance(codecs["exp_avg"], ErrorCorrected)
    o2 = QAdamW([torch.nn.Parameter(torch.zeros(8192))], bits=16, m_correct_every=10)
    assert isinstance(o2.codecs(o2.param_groups[0]["params"][0], o2.param_groups[0])["exp_avg"], ErrorCorrected)
    assert copy.deepcopy(o2.param_groups[0]["m_correct_every"]) == 10
