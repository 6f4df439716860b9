"""P6: learned (k-means) quantization codebooks: the fit, the codec, QAdamW's m_map/v_map="learned"."""

import io

import pytest
import torch

from efficient_optim import QAdamW
from efficient_optim.quant import get_map, learned_map
from efficient_optim.quant.kmeans import codebook_mse, fit_codebook
from efficient_optim.state import Quantized
from efficient_optim.state.learned import LearnedQuantized, encode_to_levels, refit_due


def heavy_signed(n=50000, seed=0):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) ** 3
    return x / x.abs().max()


def test_fit_returns_sorted_levels_with_pinned_extremes_and_beats_fixed_maps():
    u = heavy_signed()
    lv = fit_codebook(u, 4, True)
    assert lv.numel() == 16 and lv.dtype == torch.float32
    assert bool((lv[1:] > lv[:-1]).all()) and lv[0] == -1 and lv[-1] == 1
    assert torch.equal(fit_codebook(u, 4, True), lv)  # deterministic
    for name in ("linear", "dynamic", "softsign"):
        assert codebook_mse(lv, u) < codebook_mse(get_map(name, 4, True).levels, u)


def test_unsigned_fit_in_sqrt_space_has_no_zero_level():
    v = torch.randn(50000, generator=torch.Generator().manual_seed(1)) ** 2
    v[:1000] = 0  # exact zeros (unused rows) are ignored by the fit
    u = v / v.max()
    lv = fit_codebook(u, 4, False, space="sqrt")
    assert lv.numel() == 16 and bool((lv > 0).all()) and lv[-1] == 1 and bool((lv[1:] > lv[:-1]).all())
    nz = u[u > 0]
    sqrt_mse = codebook_mse(lv.sqrt(), nz.sqrt())
    assert sqrt_mse < codebook_mse(get_map("linear_nozero", 4, False).levels.sqrt(), nz.sqrt())
    # tiny clustered values keep distinct, positive levels (a regression: they once went negative)
    tiny = torch.cat([torch.full((5000,), 1e-9), torch.full((5000,), 2e-9), torch.rand(100) * 1e-3, torch.ones(1)])
    lt = fit_codebook(tiny, 4, False, space="sqrt")
    assert bool((lt > 0).all()) and bool((lt[1:] > lt[:-1]).all())


def test_a_fitted_codebook_builds_a_quant_map_for_the_fused_path():
    """Fit on block-normalized values (what the codec rounds), then use the map through the plain
    ``Quantized`` codec (the fused kernel's path): it beats the dynamic map on the same data."""
    x = heavy_signed(8192, seed=3)
    blocks = x.view(-1, 128)
    lv = fit_codebook(blocks / blocks.abs().amax(dim=1, keepdim=True), 4, True)
    errs = {}
    for name, qmap in (("learned", learned_map(lv, 4, True)), ("dynamic", "dynamic")):
        codec = Quantized(4, 128, qmap, True)
        state, p = {}, torch.empty(8192)
        codec.init(state, "m", p)
        codec.encode(state, "m", x)
        errs[name] = float((codec.decode(state, "m", p) - x).norm() / x.norm())
    assert errs["learned"] < errs["dynamic"]


def test_codec_round_trips_to_the_nearest_level():
    codec = LearnedQuantized(4, 128, True, "nearest", "float32", refit_every=0)
    p = torch.empty(8, 512)
    state = {}
    codec.init(state, "m", p)
    assert set(state) == set(codec.expected("m", p))
    x = heavy_signed(4096, seed=2).view(8, 512)
    codec.encode(state, "m", x)
    levels = state["m.levels"]
    blocks = x.reshape(-1, 128)
    scale = blocks.abs().amax(dim=1, keepdim=True)
    idx = (blocks / scale).unsqueeze(-1).sub(levels).abs().argmin(dim=-1)
    expected = (levels[idx] * scale).view(8, 512)
    torch.testing.assert_close(codec.decode(state, "m", p), expected, rtol=0, atol=1e-7)
    # re-encoding what was decoded changes nothing (a fixed point), and the codebook is kept (refit_every=0)
    y = codec.decode(state, "m", p)
    codec.encode(state, "m", y)
    torch.testing.assert_close(codec.decode(state, "m", p), y, rtol=0, atol=1e-7)
    assert int(state["m.encodes"]) == 2


def test_stochastic_rounding_to_levels_is_unbiased():
    lv = torch.tensor([-1.0, -0.2, 0.0, 0.1, 1.0])
    u = torch.full((200000,), 0.03)
    codes = encode_to_levels(lv, u, "stochastic", salt=5)
    assert float(lv[codes].mean()) == pytest.approx(0.03, abs=1e-3)
    assert set(codes.unique().tolist()) == {2, 3}


def test_refit_schedule():
    due = [c for c in range(300) if refit_due(c, 100, True)]
    assert due == [0, 1, 2, 4, 8, 16, 32, 64, 100, 200]
    assert [c for c in range(300) if refit_due(c, 100, False)] == [0, 100, 200]
    assert [c for c in range(50) if refit_due(c, 0, True)] == [0]


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


def test_qadamw_learned_maps_train_store_the_codebook_and_resume_exactly():
    kw = dict(lr=1e-3, bits=4, m_map="learned", v_map="learned", map_refit_every=4, min_quantize_numel=0)
    m1 = _model()
    o1 = QAdamW(m1.parameters(), **kw)
    first = _steps(m1, o1, 0, 1)
    full = _steps(m1, o1, 1, 14)
    assert full < first
    st = o1.state[m1[0].weight]
    assert st["exp_avg.levels"].shape == (16,) and bool((st["exp_avg_sq.levels"] > 0).all())
    m2 = _model()
    o2 = QAdamW(m2.parameters(), **kw)
    _steps(m2, o2, 0, 6)  # the resumed half refits at steps 8 and 12
    buf = io.BytesIO()
    torch.save({"model": m2.state_dict(), "opt": o2.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    m3 = _model()
    m3.load_state_dict(ck["model"])
    o3 = QAdamW(m3.parameters(), **kw)
    o3.load_state_dict(ck["opt"])
    assert _steps(m3, o3, 6, 14) == full
    for a, b in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(o3.state[m3[0].weight]["exp_avg.levels"], st["exp_avg.levels"])


def test_learned_codec_settings_are_validated():
    with pytest.raises(ValueError, match="refit_every"):
        LearnedQuantized(4, refit_every=-1)
    with pytest.raises(ValueError, match="map_refit_every"):
        QAdamW([torch.nn.Parameter(torch.zeros(4))], map_refit_every=-2)
    with pytest.raises(ValueError, match="bits"):
        LearnedQuantized(3)
