"""``effopt theory``: problems with known optima, rate/floor measurement, the error-floor model, EMA error
accumulation against the geometric sums, bits vs reachable epsilon, and a quick end-to-end run."""

import json
import math

import pytest
import torch

from efficient_optim.analysis.theory import bits as bitlib
from efficient_optim.analysis.theory.convergence import predict, steps_per_decade, summarize, track
from efficient_optim.analysis.theory.ema import closer_to, ema_error
from efficient_optim.analysis.theory.problems import least_squares, logistic, quadratic
from efficient_optim.cli import main
from efficient_optim.quant import get_map
from efficient_optim.registry import create_optimizer
from efficient_optim.state import Quantized
from efficient_optim.state.error_feedback import ErrorFeedback


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_problems_have_their_stated_optimum_and_conditioning():
    q = quadratic(n=16, kappa=50.0)
    assert q.kappa == pytest.approx(50.0) and q.loss(q.x_star.float()) < 1e-10
    assert float(q.grad(q.x_star.float()).abs().max()) == 0.0
    ls = least_squares(n=16, samples=64, kappa=20.0)
    assert ls.kappa == pytest.approx(20.0, rel=1e-6) and ls.f_star > 0
    assert ls.loss(ls.x_star.float()) - ls.f_star < 1e-9
    lg = logistic(n=8, samples=64, reg=0.05)
    assert float(lg.grad(lg.x_star.float()).norm()) < 1e-5 and lg.mu == 0.05 and lg.L > lg.mu
    with pytest.raises(ValueError, match="kappa"):
        quadratic(kappa=0.5)


def test_gradient_descent_rate_matches_theory_and_the_shadow_of_itself_has_no_error():
    p = quadratic(n=16, kappa=10.0)
    make = lambda ps: create_optimizer("sgd", ps, lr=1.0, momentum=0.0)  # noqa: E731  lr = 1/L
    s = summarize(track(p, make, make, 400))
    # the slowest eigendirection contracts by 1 - mu/L = 0.9 per step: 21.85 steps per decade
    assert s["steps_per_decade"] == pytest.approx(-1 / math.log10(0.9), rel=0.1)
    assert s["floor_reached"] and s["floor"] < 1e-6
    assert s["rho_linear"] == 0.0 and s["err_floor_rms"] == 0.0


def _trace(dist, err=None, ref=None):
    return {"dist": dist, "subopt": dist, "err": err or [], "ref_update": ref or [], "update": [], "diverged_at": None}


def test_summarize_finds_the_linear_phase_and_the_floor():
    dist = [max(10 ** (-t / 10), 1e-6) for t in range(200)]
    s = summarize(_trace(dist))
    assert s["floor"] == pytest.approx(1e-6) and s["floor_reached"]
    assert s["steps_per_decade"] == pytest.approx(10.0, rel=0.02)
    falling = summarize(_trace([10 ** (-t / 100) for t in range(200)]))
    assert not falling["floor_reached"]


def test_predictions_follow_the_stated_model():
    ref = {"q": 0.9, "floor": 1e-6, "floor_reached": True}
    run = {"rho_linear": 0.1, "update_ratio_linear": 0.5, "err_floor_rms": 1e-7, "steps_per_decade": 21.0,
           "floor": 1.0e-6, "floor_reached": True}  # fmt: skip
    p = predict(run, ref)
    assert p["rate_aligned_slow"] == pytest.approx(steps_per_decade(0.95))
    assert p["rate_aligned_fast"] == pytest.approx(steps_per_decade(0.85))
    assert p["rate_independent"] == pytest.approx(steps_per_decade(math.hypot(0.9, 0.05)))
    assert p["floor_aligned"] == pytest.approx(1e-6 + 1e-7 / 0.1)
    assert p["floor_independent"] == pytest.approx(math.sqrt(1e-12 + 1e-14 / (1 - 0.81)))
    assert p["rate_in_band"] and p["floor_below_aligned"] and p["floor_near_independent"]
    assert predict(run, {"q": None})["rate_in_band"] is None


def test_ema_errors_independent_for_stochastic_rounding_aligned_for_nearest_bounded_with_feedback():
    kw = dict(beta=0.9, steps=300, signal=1.0, noise=0.1, shape=(32, 32))
    sr = ema_error(Quantized(4, rounding="stochastic"), **kw)["steady"]
    assert sr["ratio"] == pytest.approx(sr["independent"], rel=0.2) and closer_to(sr) == "independent"
    near = ema_error(Quantized(4), **kw)["steady"]
    assert closer_to(near) == "aligned" and near["ratio"] > 2 * near["independent"]
    ef = ema_error(ErrorFeedback(Quantized(4), residual=torch.float32, decay=0.9), beta=0.9, steps=300, signal=0.0,
                   noise=1.0, shape=(32, 32))["steady"]  # fmt: skip
    assert ef["ratio"] < 1.0 and closer_to(ef) == "below independent"
    with pytest.raises(ValueError, match="beta"):
        ema_error(Quantized(8), beta=1.0, steps=10)


def test_bits_levels_bound_and_reachable_eps():
    assert torch.equal(bitlib.linear_levels(4), get_map("linear", 4, True).levels)
    assert torch.equal(bitlib.linear_levels(8), get_map("linear", 8, True).levels)
    p = quadratic(n=16, kappa=10.0)
    bounds = [bitlib.best_representable(p, b, block_size=16) for b in (5, 6, 7)]
    assert 1.6 < bounds[0] / bounds[1] < 2.5 and 1.6 < bounds[1] / bounds[2] < 2.5  # a bit halves the bound
    ef = bitlib.reachable_eps(p, "weights", 6, "nearest", True, steps=300, block_size=16)["eps"]
    near = bitlib.reachable_eps(p, "weights", 6, "nearest", False, steps=300, block_size=16)["eps"]
    assert bounds[1] <= ef < 2 * bounds[1] < near
    fp32 = bitlib.reachable_eps(p, "momentum", 32, steps=300, block_size=16)["eps"]
    assert fp32 < 1e-5
    with pytest.raises(ValueError, match="bits"):
        bitlib.linear_levels(1)


def test_quick_command_writes_json_figures_and_report(tmp_path, capsys):
    out = tmp_path / "theory"
    assert main(["theory", "--quick", "--out", str(out)]) == 0
    data = json.loads((out / "theory.json").read_text())
    assert {"convergence", "ema", "bits"} <= set(data)
    runs = {(r["problem"], r["optimizer"]) for r in data["convergence"]["runs"]}
    assert ("quadratic-k10", "qadamw4") in runs and ("quadratic-k10", "adamw") in runs  # reference added
    sgd8 = next(r for r in data["convergence"]["runs"] if r["optimizer"] == "sgd8")
    assert sgd8["reference"] == "sgd" and sgd8["summary"]["rho_linear"] > 0
    report = (out / "report.md").read_text()
    assert "## Convergence" in report and "## Bits vs reachable epsilon" in report
    for part in ("convergence", "ema", "bits"):
        assert (out / f"theory_{part}.png").is_file()
    assert main(["theory", "--report-only", "--out", str(out)]) == 0


@pytest.mark.parametrize("argv,message", [
    (["--parts", "nope"], "unknown --parts"),
    (["--optimizers", "nosuch"], "unknown optimizer"),
    (["--optimizers", "adamw+weight_decay=0.1"], "weight decay"),
    (["--kappas", "0.5"], "condition numbers"),
    (["--report-only", "--out", "no/such/folder"], "theory.json"),
])  # fmt: skip
def test_bad_input_is_a_clear_error(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["theory", *argv]) == 2
    assert message in capsys.readouterr().err
