"""Characterization probes (issue 5): statistics against direct computations, the probe's records, zero
overhead when off, sharpness by power iteration, growth-exponent fits."""

import json
import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from efficient_optim import QAdamW
from efficient_optim.analysis import StateProbe, hessian_top_eigenvalue, read_probes
from efficient_optim.analysis.stats import (
    HIST_EDGES,
    effective_rank,
    error_stats,
    growth_exponent,
    log_histogram,
    lowrank_errors,
    spearman,
    tensor_stats,
)


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def heavy(n=20000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) ** 3 + 0.1


def model_and_data(seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 64))
    g = torch.Generator().manual_seed(seed + 1)
    xs = [torch.randn(16, 64, generator=g) for _ in range(40)]
    return m, xs


def train(m, opt, xs, clip=None):
    for x in xs:
        loss = (m(x) - x.flip(1)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(m.parameters(), clip)
        opt.step()


# ----------------------------------------------------------------------------------------- statistics
def test_tensor_stats_match_direct_computation():
    from scipy import stats as sps

    x = heavy()
    s = tensor_stats(x, outlier_sigma=4.0)
    a = x.double().numpy()
    assert s["mean"] == pytest.approx(a.mean(), rel=1e-9)
    assert s["std"] == pytest.approx(a.std(ddof=0), rel=1e-9)
    assert s["kurtosis"] == pytest.approx(sps.kurtosis(a, fisher=False), rel=1e-9)
    assert s["absmax_over_std"] == pytest.approx(np.abs(a).max() / a.std(), rel=1e-9)
    assert s["outlier_frac"] == pytest.approx(np.mean(np.abs(a - a.mean()) > 4 * a.std()), abs=0)
    assert tensor_stats(torch.zeros(10))["kurtosis"] is None
    assert tensor_stats(torch.tensor([0.0, 1.0, 0.0, 2.0]))["zero_frac"] == 0.5


def test_log_histogram_matches_numpy():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(5000, generator=g) * torch.exp(3 * torch.randn(5000, generator=g)), torch.zeros(7)])
    counts, zeros = log_histogram(x)
    assert zeros == 7
    logs = np.clip(torch.log10(x[x != 0].abs()).double().numpy(), HIST_EDGES[0], HIST_EDGES[-1] - 1e-6)
    ref, _ = np.histogram(logs, bins=HIST_EDGES)
    assert sum(counts) == x.numel() - 7
    assert np.abs(np.array(counts) - ref).sum() <= 2  # a value within float rounding of a bin edge may differ


def test_error_stats_match_direct_computation():
    g = torch.Generator().manual_seed(3)
    exact = torch.randn(1000, generator=g)
    stored = exact + 0.05 * torch.randn(1000, generator=g)
    stored[:10] = 0
    e = error_stats(stored, exact, block_size=100)
    d = (stored - exact).double()
    assert e["err_rel_l2"] == pytest.approx(float(d.norm() / exact.double().norm()), rel=1e-9)
    assert e["err_max_abs"] == pytest.approx(float(d.abs().max()), rel=1e-9)
    assert e["flushed_frac"] == pytest.approx(0.01)
    blocks = [float(d[i : i + 100].norm() / exact.double()[i : i + 100].norm()) for i in range(0, 1000, 100)]
    assert e["block_err_max"] == pytest.approx(max(blocks), rel=1e-9)
    assert e["block_err_mean"] == pytest.approx(sum(blocks) / 10, rel=1e-9)


def test_effective_rank_and_lowrank_errors():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(40, 3, generator=g), torch.randn(3, 30, generator=g)
    m = u @ v
    assert lowrank_errors(m, (1, 3))[3] == pytest.approx(0.0, abs=1e-6)
    sv = torch.linalg.svdvals(m.double())
    assert lowrank_errors(m, (1,))[1] == pytest.approx(float(sv[1:].norm() / sv.norm()), rel=1e-9)
    p = sv / sv.sum()
    p = p[p > 0]
    assert effective_rank(m) == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-6)
    assert effective_rank(torch.eye(8)) == pytest.approx(8.0)


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.0])
def test_growth_exponent_recovers_power_laws(alpha):
    steps = list(range(10, 1000, 10))
    fit = growth_exponent(steps, [0.3 * s**alpha for s in steps])
    assert fit["alpha"] == pytest.approx(alpha, abs=1e-9)
    assert fit["c"] == pytest.approx(0.3, rel=1e-9)
    assert growth_exponent([1, 2], [1.0, 2.0]) is None


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2], [1, 2]) is None


# -------------------------------------------------------------------------------------------- probe
def test_probe_records_match_statistics_of_the_optimizer_states(tmp_path):
    m, xs = model_and_data()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    probe = StateProbe(opt, m.named_parameters(), path=tmp_path / "p.jsonl", every=5, early=2, lowrank_every=10)
    with probe:
        train(m, opt, xs[:10])
    assert not probe.attached
    recs = read_probes(tmp_path / "p.jsonl")
    assert recs == probe.records
    assert recs[0]["kind"] == "meta"
    last = [r for r in recs if r["kind"] == "state" and r["step"] == 10]
    assert {(r["param"], r["state"]) for r in last} == {(n, s) for n, _ in m.named_parameters() for s in ("exp_avg", "exp_avg_sq")}
    for r in last:
        p = dict(m.named_parameters())[r["param"]]
        direct = tensor_stats(opt.state[p][r["state"]])
        for key in ("mean", "std", "kurtosis", "absmax_over_std", "outlier_frac"):
            assert r[key] == pytest.approx(direct[key], rel=1e-9, abs=1e-12)
        # fp32 states equal the shadow up to float rounding (same EMA, different op order)
        assert r["err_rel_l2"] < 1e-5
        if p.dim() == 2:
            assert r["effective_rank"] == pytest.approx(effective_rank(opt.state[p][r["state"]]), rel=1e-6)
    assert sorted({r["step"] for r in recs if r["kind"] == "step"}) == [1, 2, 5, 10]


def test_probe_update_ratio_and_shadow_of_a_4bit_optimizer():
    m, xs = model_and_data()
    opt = QAdamW(m.parameters(), lr=1e-3, bits=4, min_quantize_numel=0, fused=False)
    probe = StateProbe(opt, m.named_parameters(), every=100, early=3).attach()
    train(m, opt, xs[:2])
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    shadow_m = {n: probe._shadow[(i, "exp_avg")].clone() for i, (n, _, _) in enumerate(probe.params)}
    train(m, opt, xs[2:3])
    probe.detach()
    for n, p in m.named_parameters():
        rec = next(r for r in probe.records if r["kind"] == "layer" and r["step"] == 3 and r["param"] == n)
        assert rec["update_ratio"] == pytest.approx(float((p.detach() - before[n]).norm() / before[n].norm()), rel=1e-6)
        srec = next(r for r in probe.records if r["kind"] == "state" and r["step"] == 3 and r["param"] == n and r["state"] == "exp_avg")
        exact = 0.9 * shadow_m[n] + 0.1 * p.grad
        assert srec["err_l2"] == pytest.approx(float((opt.codecs(p, opt.param_groups[0])["exp_avg"].decode(opt.state[p], "exp_avg", p) - exact).norm()), rel=1e-4)
        assert 0 < srec["err_rel_l2"] < 1


def test_probe_reports_what_each_codec_says_of_itself():
    """Block size, tracked residual and codebook come from the codec (``scale_block_size``, ``residual_value``,
    ``codebook``), for a wrapper as for the codec it wraps."""
    from efficient_optim import HybridAdam
    from efficient_optim.state import Quantized
    from efficient_optim.state.error_feedback import ErrorFeedback
    from efficient_optim.state.learned import LearnedQuantized

    m, xs = model_and_data()
    m_codec, v_codec = ErrorFeedback(Quantized(4, block_size=64)), LearnedQuantized(4, signed=False)
    opt = HybridAdam(m.parameters(), lr=1e-3, m_codec=m_codec, v_codec=v_codec, min_quantize_numel=0)
    probe = StateProbe(opt, m.named_parameters(), every=100, early=3).attach()
    train(m, opt, xs[:3])
    p = m[0].weight
    recs = {r["state"]: r for r in probe.records if r["kind"] == "state" and r["step"] == 3 and r["param"] == "0.weight"}
    stored = m_codec.decode(opt.state[p], "exp_avg", p)
    exact = probe._shadow[(0, "exp_avg")]
    assert recs["exp_avg"]["block_err_max"] == pytest.approx(error_stats(stored, exact, 64)["block_err_max"], rel=1e-9)
    e = m_codec.residual_value(opt.state[p], "exp_avg", p)
    assert recs["exp_avg"]["residual_norm"] == pytest.approx(float(e.norm()), rel=1e-6)
    assert recs["exp_avg"]["residual_tracking_err"] is not None
    assert recs["exp_avg_sq"]["levels"] == pytest.approx(v_codec.codebook(opt.state[p], "exp_avg_sq").tolist(), abs=1e-6)
    assert "levels" not in recs["exp_avg"] and "residual_norm" not in recs["exp_avg_sq"]
    probe.detach()


def test_probe_records_clipping_skips_and_lowrank_stats():
    m, xs = model_and_data()
    opt = QAdamW(m.parameters(), lr=1e-3, bits=8)
    opt.lowrank_stats = lambda names=None: {"x": {"effective_rank": 2.0, "reconstruction_error": 0.1}}
    probe = StateProbe(opt, m.named_parameters(), every=1, early=0, clip=1e-3)
    with probe, pytest.warns(RuntimeWarning):
        train(m, opt, xs[:2], clip=1e-3)
        m[0].weight.grad[0, 0] = float("nan")
        opt.step()
        train(m, opt, xs[2:3], clip=1e-3)
    kinds = [r["kind"] for r in probe.records]
    assert kinds.count("clip") == 3
    assert [r["step"] for r in probe.records if r["kind"] == "skipped"] == [3]
    assert {r["step"] for r in probe.records if r["kind"] == "lowrank_stats"} == {1, 2, 3}
    assert probe.step == 3


def test_probe_truncates_its_log_on_resume(tmp_path):
    m, xs = model_and_data()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    path = tmp_path / "p.jsonl"
    with StateProbe(opt, m.named_parameters(), path=path, every=2, early=0):
        train(m, opt, xs[:6])
    sd = opt.state_dict()
    with path.open("a") as f:  # lines of steps the resumed run will redo
        f.write(json.dumps({"kind": "step", "step": 9}) + "\n")
    opt2 = torch.optim.AdamW(m.parameters(), lr=1e-3)
    opt2.load_state_dict(sd)
    with StateProbe(opt2, m.named_parameters(), path=path, every=2, early=0):
        train(m, opt2, xs[6:8])
    steps = [r["step"] for r in read_probes(path) if r["kind"] == "step"]
    assert steps == [2, 4, 6, 8]
    assert any(r["kind"] == "shadow_start" and r["step"] == 6 for r in read_probes(path))


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _counted_step(m, opt, x):
    loss = (m(x) - x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    with OpCounter() as c:
        opt.step()
    return c.ops


@pytest.mark.parametrize("make", [lambda p: torch.optim.AdamW(p, lr=1e-3), lambda p: QAdamW(p, lr=1e-3, bits=4, fused=False)])
def test_probe_costs_nothing_when_off(make):
    """Detached (or never attached): the step runs exactly the same tensor operations (so allocates
    nothing more) and no hook is left registered. Attached with the shadow off, a step that is not a
    probe step adds no tensor operation either."""
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    m1, _ = model_and_data()
    m2, _ = model_and_data()
    o1, o2 = make(m1.parameters()), make(m2.parameters())
    for _ in range(2):
        _counted_step(m1, o1, x)
    probe = StateProbe(o2, m2.named_parameters(), every=5, early=1).attach()
    for _ in range(2):
        _counted_step(m2, o2, x)
    probe.detach()
    assert not o2._optimizer_step_pre_hooks and not o2._optimizer_step_post_hooks
    base = _counted_step(m1, o1, x)
    assert _counted_step(m2, o2, x) == base
    lazy = StateProbe(o2, m2.named_parameters(), every=1000, early=0, shadow=False).attach()
    _counted_step(m2, o2, x)  # the first hooked step reads the step counter once
    assert _counted_step(m2, o2, x) == _counted_step(m1, o1, x)
    lazy.detach()


# ---------------------------------------------------------------------------------------- sharpness
def test_top_hessian_eigenvalue_of_a_quadratic():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(12, 12, generator=g, dtype=torch.float64)
    a = q @ q.T + torch.diag(torch.arange(12, dtype=torch.float64))
    x = torch.randn(12, generator=g, dtype=torch.float64, requires_grad=True)
    res = hessian_top_eigenvalue(lambda: 0.5 * x @ a @ x, [x], iters=500, tol=1e-10)
    assert res["eigenvalue"] == pytest.approx(float(torch.linalg.eigvalsh(a).max()), rel=1e-6)
    assert res["converged"]


def test_top_hessian_eigenvalue_of_a_small_network_matches_the_full_hessian():
    torch.manual_seed(0)
    w1 = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(1, 6, dtype=torch.float64, requires_grad=True)
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.randn(20, 1, dtype=torch.float64)

    def loss_of(a, b):
        return ((torch.tanh(x @ a.T) @ b.T - y) ** 2).mean()

    res = hessian_top_eigenvalue(lambda: loss_of(w1, w2), [w1, w2], iters=1000, tol=1e-12)
    flat = torch.cat([w1.detach().flatten(), w2.detach().flatten()])
    h = torch.autograd.functional.hessian(lambda f: loss_of(f[:24].view(6, 4), f[24:].view(1, 6)), flat)
    eig = torch.linalg.eigvalsh(h)
    top = eig[eig.abs().argmax()]
    assert res["eigenvalue"] == pytest.approx(float(top), rel=1e-4)
