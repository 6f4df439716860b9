"""Low-rank codec, LowRankAdam and the error-feedback wrapper: references, bounds, failures, checkpoints."""

import io

import pytest
import torch

import efficient_optim as eo
from efficient_optim import state_breakdown, state_bytes
from efficient_optim.optim.lowrank_adam import UPDATE_STRATEGIES, LowRankAdam
from efficient_optim.state import Dense, Quantized
from efficient_optim.state.error_feedback import ErrorFeedback
from efficient_optim.state.lowrank import (
    Arena,
    LowRank,
    entropy_rank,
    numerical_rank,
    randomized_svd,
    randomized_svd_numel,
)


def low_rank_matrix(m, n, r, seed=0, noise=0.0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g)
    return a + noise * torch.randn(m, n, generator=g)


def decaying_matrix(m, n, seed=0, decay=0.8):
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
    w, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    s = decay ** torch.arange(k, dtype=torch.float32)
    return (u * s) @ w.t(), s


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(48, 96), torch.nn.GELU(), torch.nn.Linear(96, 64), torch.nn.LayerNorm(64),
                               torch.nn.Linear(64, 4))  # fmt: skip


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 4, generator=g)
    for _ in range(n):
        x = torch.randn(32, 48, generator=g)
        yield x, torch.tanh(x @ w)


def train(model, opt, data):
    loss = None
    for x, y in data:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
    return loss.item()


# ------------------------------------------------------------------------------------ randomized SVD
@pytest.mark.parametrize("shape", [(80, 50), (50, 80)])
def test_randomized_svd_recovers_an_exactly_low_rank_matrix(shape):
    a = low_rank_matrix(*shape, r=6)
    u, s, w = randomized_svd(a, 6, generator=torch.Generator().manual_seed(0))
    ref = torch.linalg.svdvals(a)[:6]
    torch.testing.assert_close(s, ref, rtol=1e-4, atol=1e-4)
    assert float((a - (u * s) @ w.t()).norm() / a.norm()) < 1e-5
    torch.testing.assert_close(u.t() @ u, torch.eye(6), atol=1e-5, rtol=0)
    # the same subspace as torch.linalg.svd's top-6 left singular vectors
    uref = torch.linalg.svd(a, full_matrices=False)[0][:, :6]
    torch.testing.assert_close((u.t() @ uref).abs().svd()[1], torch.ones(6), atol=1e-4, rtol=0)


def test_randomized_svd_error_is_close_to_the_eckart_young_optimum():
    a, s = decaying_matrix(120, 90, decay=0.85)
    for r, q in [(8, 2), (16, 1), (24, 2)]:
        u, sv, w = randomized_svd(a, r, power_iters=q, generator=torch.Generator().manual_seed(r))
        err = float((a - (u * sv) @ w.t()).norm())
        best = float(s[r:].square().sum().sqrt())
        assert best <= err <= 1.05 * best, (r, q, err, best)


def test_randomized_svd_is_reproducible_and_uses_the_workspace():
    a = low_rank_matrix(70, 40, 10, noise=0.1)
    buf = torch.full((randomized_svd_numel(70, 40, 8, 8),), float("nan"))
    arena = Arena(buf, "cpu")
    u1, s1, _ = randomized_svd(a, 8, generator=torch.Generator().manual_seed(3), arena=arena)
    assert arena.offset == buf.numel()  # the layout fills exactly the advertised size
    u2, s2, _ = randomized_svd(a, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(u1, u2) and torch.equal(s1, s2)


def test_rank_diagnostics():
    assert entropy_rank(torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert entropy_rank(torch.ones(5)) == pytest.approx(5.0)
    assert entropy_rank(torch.zeros(4)) is None
    assert numerical_rank(torch.tensor([1.0, 0.5, 1e-4])) == 2


# ------------------------------------------------------------------------------------------ codec
@pytest.mark.parametrize("refresh", ["randomized", "periodic", "online"])
def test_codec_stores_a_rank_r_matrix_exactly_and_reports_its_error(refresh):
    p = torch.zeros(64, 48)
    c = LowRank(rank=5, refresh=refresh, refresh_every=3, min_numel=0)
    st = {}
    c.init(st, "m", p)
    assert set(st) == {"m.u", "m.v", "m.meta"} and c.nbytes(st, "m") == 4 * 5 * (64 + 48) + 16
    assert st["m.u"].shape == (48, 5)  # the basis lives on the short side
    x = low_rank_matrix(64, 48, 5)
    c.encode(st, "m", x, salt=1)
    assert float((c.decode(st, "m", p) - x).norm() / x.norm()) < 1e-5
    # a full-rank value: the reported error is the true one
    y = low_rank_matrix(64, 48, 5, seed=2, noise=0.5)
    c.encode(st, "m", y, salt=2)
    true = float((c.decode(st, "m", p) - y).norm() / y.norm())
    assert float(c.relative_error(st, "m", y)) == pytest.approx(true, rel=1e-3)
    assert int(st["m.meta"][0]) == 2 and c.svd_failures(st, "m") == 0


def test_codec_keeps_small_and_1d_tensors_dense_and_decides_on_rank():
    c = LowRank(rank=16)
    assert not c.is_lowrank(torch.zeros(10000))
    assert not c.is_lowrank(torch.zeros(32, 64))  # < 4096 elements
    assert c.is_lowrank(torch.zeros(64, 128))
    assert not c.is_lowrank(torch.zeros(30, 1000))  # 16 > 0.5 * 30
    assert not c.is_lowrank(torch.zeros(8, 4, 16, 16))  # the (8, 1024) matrix: 16 > 0.5 * 8
    assert LowRank(rank=4).is_lowrank(torch.zeros(8, 4, 16, 16))
    st = {}
    c.init(st, "m", torch.zeros(100))
    assert set(st) == {"m"}
    c.encode(st, "m", torch.arange(100.0))
    assert torch.equal(c.decode(st, "m", torch.zeros(100)), torch.arange(100.0))


def test_randomized_refresh_between_refreshes_is_the_ema_in_factored_space():
    """With U fixed, encoding beta*UV^T + (1-beta) g stores V <- beta V + (1-beta) g^T U."""
    c = LowRank(rank=4, refresh="randomized", refresh_every=100, min_numel=0)
    p = torch.zeros(30, 40)
    st = {}
    c.init(st, "m", p)
    c.encode(st, "m", low_rank_matrix(30, 40, 6, noise=0.2))
    u, v = st["m.u"].clone(), st["m.v"].clone()
    g = torch.randn(30, 40)
    c.encode(st, "m", 0.9 * c.decode(st, "m", p) + 0.1 * g)
    assert torch.equal(st["m.u"], u)
    torch.testing.assert_close(st["m.v"], 0.9 * v + 0.1 * g.t() @ u, atol=1e-5, rtol=1e-5)


def test_online_update_reduces_the_regression_objective():
    """Each online step is a descent step on 1/2 ||U V^T - g||^2 and it converges to the best rank-r fit."""
    g = low_rank_matrix(40, 60, 4, noise=0.3)
    c = LowRank(rank=4, refresh="online", refresh_every=0, min_numel=0)
    p = torch.zeros(40, 60)
    st = {}
    c.init(st, "m", p)
    st["m.u"].copy_(torch.linalg.qr(torch.randn(40, 4))[0])  # a random start, not an SVD of g
    st["m.v"].copy_(torch.randn(60, 4))
    st["m.meta"][0] = 1
    f = []
    for _ in range(40):
        m = c.decode(st, "m", p)
        f.append(0.5 * float((m - g).square().sum()))
        c.encode(st, "m", 0.9 * m + 0.1 * g)
    assert all(b <= a * (1 + 1e-6) for a, b in zip(f, f[1:]))
    best = 0.5 * float(torch.linalg.svdvals(g)[4:].square().sum())
    assert f[-1] < 1.3 * best < 0.1 * f[0]


def test_nonnegative_codec_decodes_a_nonnegative_square():
    c = LowRank(rank=3, nonnegative=True, min_numel=0)
    p = torch.zeros(30, 20)
    st = {}
    c.init(st, "v", p)
    v = low_rank_matrix(30, 20, 2).square()
    c.encode(st, "v", v)
    out = c.decode(st, "v", p)
    assert bool((out >= 0).all())
    assert float((out - v).norm() / v.norm()) < 0.5


def _raise(*a, **k):
    raise torch.linalg.LinAlgError("simulated non-convergence")


def test_svd_failure_keeps_the_previous_basis_and_is_counted(monkeypatch):
    c = LowRank(rank=4, refresh="randomized", refresh_every=1, min_numel=0)
    p = torch.zeros(30, 50)
    st = {}
    c.init(st, "m", p)
    x = low_rank_matrix(30, 50, 4)
    c.encode(st, "m", x)
    u = st["m.u"].clone()
    monkeypatch.setattr(torch.linalg, "svd", _raise)
    y = low_rank_matrix(30, 50, 4, seed=5)
    c.encode(st, "m", y)
    assert c.svd_failures(st, "m") == 1
    assert torch.equal(st["m.u"], u)  # basis kept, coefficients projected
    torch.testing.assert_close(st["m.v"], y.t() @ u)
    # a non-finite result counts as a failure too
    monkeypatch.setattr(torch.linalg, "svd", lambda b, **k: [t.fill_(float("nan")) for t in k["out"]])
    c.encode(st, "m", y)
    assert c.svd_failures(st, "m") == 2 and torch.isfinite(st["m.v"]).all()


def test_failure_on_the_first_encode_falls_back_to_qr_then_to_coordinates(monkeypatch):
    p = torch.zeros(30, 40)
    x = low_rank_matrix(30, 40, 3)
    monkeypatch.setattr(torch.linalg, "svd", _raise)
    c = LowRank(rank=3, min_numel=0)
    st = {}
    c.init(st, "m", p)
    c.encode(st, "m", x)  # QR of the sketch: the exact range of a rank-3 matrix
    assert c.svd_failures(st, "m") == 1
    assert float((c.decode(st, "m", p) - x).norm() / x.norm()) < 1e-4
    monkeypatch.setattr(torch.linalg, "qr", _raise)
    st = {}
    c.init(st, "m", p)
    c.encode(st, "m", x)
    assert torch.equal(st["m.u"], torch.eye(30, 3)) and torch.isfinite(st["m.v"]).all()


def test_codec_randomness_comes_from_seed_salt_and_count_not_the_global_rng():
    x = low_rank_matrix(40, 30, 12, noise=0.3)
    outs = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        c = LowRank(rank=4, power_iters=0, oversample=0, min_numel=0, seed=5)
        st = {}
        c.init(st, "m", torch.zeros(40, 30))
        c.encode(st, "m", x, salt=9)
        outs.append(st["m.u"].clone())
    assert torch.equal(outs[0], outs[1])
    c2 = LowRank(rank=4, power_iters=0, oversample=0, min_numel=0, seed=6)
    st = {}
    c2.init(st, "m", torch.zeros(40, 30))
    c2.encode(st, "m", x, salt=9)
    assert not torch.equal(st["m.u"], outs[0])


# -------------------------------------------------------------------------------------- LowRankAdam
@pytest.mark.parametrize("strategy", ["online", "randomized"])
def test_full_rank_lowrank_adam_matches_adamw(strategy):
    """At rank = min(m, n) the factors hold the moment exactly: the same numbers as torch.optim.AdamW."""
    a, b = mlp(), mlp()
    ref = torch.optim.AdamW(a.parameters(), lr=2e-3, weight_decay=0.1)
    groups = [{"params": [b[0].weight], "rank": 48}, {"params": [b[2].weight], "rank": 64},
              {"params": [p for n, p in b.named_parameters() if n not in ("0.weight", "2.weight")]}]  # fmt: skip
    ours = LowRankAdam(groups, lr=2e-3, weight_decay=0.1, update_strategy=strategy, v_storage="dense", svd_freq=7,
                       max_rank_fraction=1.0, min_lowrank_numel=1000)  # fmt: skip
    la, lb = train(a, ref, batches(40)), train(b, ours, batches(40))
    assert [ours.kind(p, g) for g in ours.param_groups for p in g["params"]][:2] == [strategy, strategy]
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-4, atol=1e-4)
    assert lb == pytest.approx(la, rel=1e-4)


@pytest.mark.parametrize("tail", ["gradient", "ema"])
@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_tail_outside_the_subspace_follows_the_reference_formula(tail, shape):
    """Step 2 of rank-2 LowRankAdam (online) against the formula of ``_codec_step``'s docstring: with
    ``tail="gradient"`` the first moment outside span(U) is the current gradient, with ``"ema"`` it is the
    compressed EMA's ``(1 - beta1) g``."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape))
    lr, (b1, b2), eps = 1e-2, (0.9, 0.999), 1e-8
    opt = LowRankAdam([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=0.0, rank=2, update_strategy="online",
                      v_storage="dense", min_lowrank_numel=0, tail=tail)  # fmt: skip
    g1, g2 = torch.randn(shape), torch.randn(shape)
    p.grad = g1
    opt.step()
    group, state = opt.param_groups[0], opt.state[p]
    codecs = opt.codecs(p, group)
    m1 = codecs["exp_avg"].decode(state, "exp_avg", p).clone()
    v1 = codecs["exp_avg_sq"].decode(state, "exp_avg_sq", p).clone()
    u = state["exp_avg.u"].clone()  # (short side, r), orthonormal
    before = p.detach().clone()
    p.grad = g2
    opt.step()
    m = b1 * m1 + (1 - b1) * g2
    v = b2 * v1 + (1 - b2) * g2 * g2
    gm = g2 if shape[0] <= shape[1] else g2.t()
    out = gm - u @ (u.t() @ gm)  # (I - U U^T) g, oriented (short, long)
    out = out if shape[0] <= shape[1] else out.t()
    if tail == "gradient":
        mhat = (m - (1 - b1) * out) / (1 - b1**2) + out
    else:
        mhat = m / (1 - b1**2)
    expected = before - lr * mhat / ((v / (1 - b2**2)).sqrt() + eps)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)
    assert out.norm() > 0.1 * g2.norm()  # the tail is not negligible: the two settings really differ


@pytest.mark.parametrize("strategy", UPDATE_STRATEGIES)
def test_every_strategy_trains_and_reports_p7_diagnostics(strategy):
    model = mlp()
    opt = LowRankAdam(model.parameters(), lr=3e-3, rank=8, update_strategy=strategy, min_lowrank_numel=1000)
    first = train(model, opt, batches(1))
    last = train(model, opt, batches(60, seed=2))
    assert last < first
    stats = opt.lowrank_stats(model.named_parameters())
    assert set(stats) == {"0.weight", "2.weight"}  # the 4 x 64 head and vectors stay dense
    for s in stats.values():
        assert s["strategy"] == strategy and s["rank"] == 8 and s["svd_failures"] == 0
        assert 1.0 <= s["effective_rank"] <= 8.0 and 1 <= s["numerical_rank"] <= 8
        assert 0.0 <= s["reconstruction_error"] < 1.0
        assert (s["moment_error"] is not None) == (strategy in ("online", "randomized"))
    # the dense moments of the small tensors are exactly AdamW's arithmetic (fused kernel)
    assert opt.kind(model[4].weight, opt.param_groups[0]) == "dense"


def test_state_is_smaller_and_the_workspace_is_counted():
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 512))
    dense = torch.optim.AdamW(model.parameters())
    low = LowRankAdam(model.parameters(), rank=16)
    for opt in (dense, low):
        model(torch.randn(4, 256)).sum().backward()
        opt.step()
    rows = {r["key"]: r for r in state_breakdown(low)}
    ws = rows["lowrank.workspace"]["nbytes"]
    assert ws == 4 * low._m_codec(low.param_groups[0]).workspace_numel(model[1].weight) > 0
    factors = 4 * 16 * (256 + 256 + 512 + 256)
    assert state_bytes(low) >= factors + ws
    assert state_bytes(low) < 0.2 * state_bytes(dense)


def test_factor_ema_is_not_the_ema_of_the_product():
    """Two rank-1 gradients g1 = a1 b1^T, then g2 = a2 b2^T. The EMA of the product is the rank-2 matrix
    beta(1-beta) g1 + (1-beta) g2. The product of the factor EMAs is (beta(1-beta) a1 + (1-beta) a2)(beta(1-beta) b1
    + (1-beta) b2)^T: rank 1, with the cross terms a1 b2^T and a2 b1^T and the weights squared. The sound
    strategy (randomized refresh every step) stores the rank-2 EMA exactly."""
    beta = 0.9
    gen = torch.Generator().manual_seed(0)
    a = [torch.randn(64, generator=gen) for _ in range(2)]
    b = [torch.randn(80, generator=gen) for _ in range(2)]
    grads = [torch.outer(a[0], b[0]), 3 * torch.outer(a[1], b[1])]
    exact = beta * (1 - beta) * grads[0] + (1 - beta) * grads[1]
    stored = {}
    for strategy in ("factor_ema", "randomized"):
        w = torch.nn.Parameter(torch.zeros(64, 80))
        opt = LowRankAdam(
            [w], lr=1e-3, betas=(beta, 0.999), rank=2, update_strategy=strategy, v_storage="dense", svd_freq=1
        )
        for g in grads:
            w.grad = g.clone()
            opt.step()
        st = opt.state[w]
        stored[strategy] = (
            st["exp_avg.a"] @ st["exp_avg.b"].t()
            if strategy == "factor_ema"
            else st["exp_avg.u"] @ st["exp_avg.v"].t()
        )
    torch.testing.assert_close(stored["randomized"], exact, atol=1e-5, rtol=1e-4)
    # the sketch: top factors a' = u sqrt(s), b' = w sqrt(s) of each gradient, signs aligned, EMA'd separately
    fa, fb = [], []
    for g in grads:
        u, s, vh = torch.linalg.svd(g)
        fa.append(u[:, 0] * s[0].sqrt())
        fb.append(vh[0] * s[0].sqrt())
    sign = 1.0 if float(fa[0] @ fa[1]) >= 0 else -1.0
    ema_a = beta * (1 - beta) * fa[0] + (1 - beta) * sign * fa[1]
    ema_b = beta * (1 - beta) * fb[0] + (1 - beta) * sign * fb[1]
    torch.testing.assert_close(stored["factor_ema"], torch.outer(ema_a, ema_b), atol=1e-5, rtol=1e-3)
    assert float((stored["factor_ema"] - exact).norm() / exact.norm()) > 0.5
    sv = torch.linalg.svdvals(stored["factor_ema"])
    assert float(sv[1] / sv[0]) < 1e-3  # rank 1: both gradients' top factors went into the same column


def test_lowrank_adam_survives_svd_failures(monkeypatch):
    monkeypatch.setattr(torch.linalg, "svd", _raise)
    for strategy in ("online", "randomized", "periodic", "factor_ema"):
        model = mlp()
        opt = LowRankAdam(
            model.parameters(), lr=3e-3, rank=8, update_strategy=strategy, svd_freq=2, min_lowrank_numel=1000
        )
        train(model, opt, batches(6))
        assert all(torch.isfinite(p).all() for p in model.parameters())
        stats = opt.lowrank_stats()
        assert all(s["svd_failures"] >= 1 for s in stats.values()), (strategy, stats)


@pytest.mark.parametrize("kw", [
    {"update_strategy": "online"},
    {"update_strategy": "randomized", "svd_freq": 3, "v_storage": "lowrank"},
    {"update_strategy": "periodic", "svd_freq": 4},
    {"update_strategy": "factor_ema", "v_storage": "dense"},
])  # fmt: skip
def test_checkpoint_round_trip_and_bit_identical_resume(kw):
    full_model = mlp()
    full = LowRankAdam(full_model.parameters(), lr=3e-3, rank=8, min_lowrank_numel=1000, seed=3, **kw)
    train(full_model, full, batches(20))

    model = mlp()
    opt = LowRankAdam(model.parameters(), lr=3e-3, rank=8, min_lowrank_numel=1000, seed=3, **kw)
    data = list(batches(20))
    train(model, opt, data[:11])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    torch.manual_seed(1234)  # the global RNG must not matter
    model2 = mlp(seed=5)
    model2.load_state_dict(ckpt["model"])
    opt2 = LowRankAdam(model2.parameters(), lr=3e-3, rank=8, min_lowrank_numel=1000, seed=3, **kw)
    opt2.load_state_dict(ckpt["opt"])
    train(model2, opt2, data[11:])
    for pa, pb in zip(full_model.parameters(), model2.parameters()):
        assert torch.equal(pa, pb)


def test_mismatched_rank_checkpoint_raises():
    model = mlp()
    opt = LowRankAdam(model.parameters(), rank=8, min_lowrank_numel=1000)
    train(model, opt, batches(2))
    sd = opt.state_dict()
    sd["param_groups"][0]["rank"] = 4  # states of rank 8 under a rank-4 setting
    other = LowRankAdam(model.parameters(), rank=4, min_lowrank_numel=1000)
    with pytest.raises(ValueError, match="exp_avg"):
        other.load_state_dict(sd)


@pytest.mark.parametrize("kwargs,name", [
    ({"rank": 0}, "rank"), ({"rank": 2.5}, "rank"), ({"rank": True}, "rank"),
    ({"update_strategy": "svd"}, "update_strategy"), ({"svd_freq": 0, "update_strategy": "randomized"}, "svd_freq"),
    ({"svd_freq": -1}, "svd_freq"), ({"v_storage": "quantized"}, "v_storage"), ({"max_rank_fraction": 0}, "max_rank_fraction"),
    ({"max_rank_fraction": 1.5}, "max_rank_fraction"), ({"oversample": -1}, "oversample"), ({"power_iters": 1.0}, "power_iters"),
    ({"lr": -1.0}, "lr"), ({"betas": (0.9, 1.0)}, "beta2"), ({"galore_scale": 0}, "galore_scale"), ({"lowrank": 1}, "lowrank"),
    ({"nonfinite": "ignore"}, "nonfinite"), ({"min_lowrank_numel": -5}, "min_lowrank_numel"),
])  # fmt: skip
def test_invalid_hyperparameters_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LowRankAdam(mlp().parameters(), **kwargs)


@pytest.mark.parametrize("kwargs,name", [
    ({"rank": 0}, "rank"), ({"refresh": "galore"}, "refresh"), ({"refresh_every": 0}, "refresh_every"),
    ({"oversample": -2}, "oversample"), ({"max_rank_fraction": 2.0}, "max_rank_fraction"),
])  # fmt: skip
def test_invalid_codec_settings_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LowRank(**kwargs)
    assert LowRank(refresh="online", refresh_every=0).refresh_every == 0  # 0 = never re-draw, online only


def test_group_can_opt_out_and_higher_dim_and_bf16_params_work():
    conv = torch.nn.Conv2d(16, 32, 3)
    lin = torch.nn.Linear(128, 64).to(torch.bfloat16)
    opt = LowRankAdam([{"params": [conv.weight]}, {"params": [lin.weight], "lowrank": False}, {"params": [lin.bias]}],
                      rank=4, min_lowrank_numel=1000, correction_bits=None)  # fmt: skip
    for _ in range(3):
        conv.weight.grad = torch.randn_like(conv.weight)
        lin.weight.grad = torch.randn_like(lin.weight)
        lin.bias.grad = torch.randn_like(lin.bias)
        opt.step()
    assert opt.state[conv.weight]["exp_avg.u"].shape == (32, 4)  # (32, 144): the short side
    assert opt.state[conv.weight]["exp_avg.v"].shape == (16 * 9, 4)
    assert opt.state[lin.weight]["exp_avg"].dtype == torch.float32 and lin.weight.dtype == torch.bfloat16
    assert set(opt.lowrank_stats()) == {"param0"}


def test_registry_name():
    from efficient_optim import create_optimizer, list_optimizers

    assert "lowrank_adam" in list_optimizers()
    model = mlp()
    opt = create_optimizer("lowrank_adam", model, lr=1e-3, rank=8, update_strategy="randomized")
    assert isinstance(opt, LowRankAdam)
    train(model, opt, batches(2))


# ------------------------------------------------------------------------------------ error feedback
def _ema_error(codec, steps=200, beta=0.9, shape=(64, 128)):
    p = torch.zeros(shape)
    st = {}
    codec.init(st, "m", p)
    gen = torch.Generator().manual_seed(0)
    true = torch.zeros(shape)
    errs, one_step = [], []
    for t in range(steps):
        g = torch.randn(shape, generator=gen)
        value = codec.decode(st, "m", p).clone().mul_(beta).add_(g, alpha=1 - beta)
        true.mul_(beta).add_(g, alpha=1 - beta)
        codec.encode(st, "m", value, salt=t)
        errs.append(float((codec.decode(st, "m", p) - true).norm() / true.norm()))
        if "m.residual" in st:
            one_step.append(float(st["m.residual"].float().norm() / true.norm()))
    return sum(errs[-50:]) / 50, (sum(one_step[-50:]) / 50 if one_step else None), st


def test_error_feedback_stops_4bit_ema_error_from_accumulating():
    q4 = Quantized(4)
    plain, _, _ = _ema_error(q4)
    ef, _, st = _ema_error(ErrorFeedback(q4))
    exact, residual, _ = _ema_error(ErrorFeedback(q4, residual=torch.float32, decay=0.9))
    ef8, _, _ = _ema_error(ErrorFeedback(q4, residual="8bit"))
    assert ef < 0.6 * plain and ef8 < 0.6 * plain, (plain, ef, ef8)
    # decay = beta makes the stored state exactly one residual away from the true EMA
    assert exact == pytest.approx(residual, rel=1e-3)
    # memory: 4-bit codes + fp32 block scales + a bf16 residual
    assert ErrorFeedback(q4).nbytes(st, "m") == 64 * 128 // 2 + 64 * 128 // 128 * 4 + 64 * 128 * 2


def test_error_feedback_correct_every_and_codec_contract():
    q4 = Quantized(4)
    plain, _, _ = _ema_error(q4, steps=100)
    periodic, _, st = _ema_error(
        ErrorFeedback(q4, correct_every=10, decay=0.9, residual=torch.float32), steps=100
    )
    assert periodic < plain
    assert int(st["m.ef_count"]) == 100
    codec = ErrorFeedback(Dense(torch.bfloat16))
    assert set(codec.expected("m", torch.zeros(3, 4))) == {"m", "m.residual"}
    with pytest.raises(ValueError, match="residual"):
        ErrorFeedback(q4, residual=torch.float16)
    with pytest.raises(ValueError, match="correct_every"):
        ErrorFeedback(q4, correct_every=0)


def test_galore_is_its_own_rule_with_the_numbers_of_the_periodic_strategy():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(96, 64))
    b = torch.nn.Parameter(a.detach().clone())
    oa = eo.GaLoreAdamW([a], rank=4, svd_freq=2, min_lowrank_numel=0)
    ob = eo.LowRankAdam([b], rank=4, svd_freq=2, min_lowrank_numel=0, update_strategy="periodic")
    for step in range(5):
        g = torch.randn(96, 64, generator=torch.Generator().manual_seed(step))
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    assert torch.equal(a, b)
    assert set(oa.state[a]) == {"step", "exp_avg", "exp_avg_sq", "proj", "proj.meta"}
    with pytest.raises(ValueError, match="GaLore's rule is 'periodic'"):
        eo.GaLoreAdamW([{"params": [torch.nn.Parameter(torch.zeros(8, 8))], "update_strategy": "online"}])
