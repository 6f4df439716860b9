"""``effopt landscape`` and ``analysis.landscape``: filter-normalized directions, 2-D surfaces, interpolation
barriers, and a quick end-to-end run."""

import json
import math

import pytest
import torch

from efficient_optim.analysis.landscape import (
    barrier,
    filter_normalized_direction,
    interpolate,
    rise_at_radius,
    surface_2d,
)
from efficient_optim.cli import main


def test_filter_normalized_directions_match_each_filter_norm_and_skip_1d_parameters():
    w = torch.randn(5, 3) * torch.arange(1, 6).unsqueeze(1)
    b = torch.randn(5)
    d_w, d_b = filter_normalized_direction([w, b], torch.Generator().manual_seed(0))
    assert torch.allclose(d_w.norm(dim=1), w.norm(dim=1), rtol=1e-5)
    assert torch.count_nonzero(d_b) == 0
    again = filter_normalized_direction([2 * w, b], torch.Generator().manual_seed(0))[0]
    assert torch.allclose(again, 2 * d_w, rtol=1e-5)  # same raw draw, scaled to the other solution


def test_surface_of_a_quadratic_and_params_restored():
    w = torch.tensor([[1.0, 2.0]])
    d1, d2 = [torch.tensor([[1.0, 0.0]])], [torch.tensor([[0.0, 1.0]])]
    loss = lambda: float((w - torch.tensor([[1.0, 2.0]])).pow(2).sum())  # noqa: E731  minimum at the solution
    s = surface_2d(loss, [w], d1, d2, span=1.0, points=5)
    assert s["coords"] == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert s["loss"][0][4] == pytest.approx(2.0) and s["loss"][2][2] == 0.0
    assert torch.equal(w, torch.tensor([[1.0, 2.0]]))
    assert rise_at_radius(s, 1.0, width=0.1) == pytest.approx(1.0)  # the 4 axis points at distance 1
    assert rise_at_radius(s, 1.0) == pytest.approx((4 * 1.0 + 8 * 1.25) / 12)  # and (+-1, +-0.5), (+-0.5, +-1)
    with pytest.raises(ValueError, match="odd"):
        surface_2d(loss, [w], d1, d2, points=4)


def test_interpolation_barrier_of_a_double_well_and_of_a_flat_path():
    x = torch.zeros(1)
    loss = lambda: float((x**2 - 1) ** 2)  # noqa: E731  minima at -1 and +1, a bump of 1 at 0
    path = interpolate({"train": loss}, [x], [torch.tensor([-1.0])], [torch.tensor([1.0])], points=5)
    assert path["t"] == [0.0, 0.25, 0.5, 0.75, 1.0] and x.item() == 0.0
    b = barrier(path["t"], path["train"])
    assert b["height"] == pytest.approx(1.0) and b["t"] == 0.5 and b["over_max_end"] == pytest.approx(1.0)
    assert b["relative"] is None  # the end losses are 0: no relative height
    flat = barrier([0.0, 0.5, 1.0], [2.0, 1.5, 1.0])
    assert flat["height"] == 0.0 and flat["t"] is None and flat["relative"] == 0.0
    assert barrier([0.0, 1.0], [1.0, None])["height"] is None


def test_quick_command_runs_end_to_end_and_reuses_its_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFOPT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "ls"
    assert main(["landscape", "--quick", "--out", str(out)]) == 0
    data = json.loads((out / "landscape.json").read_text())
    assert len(data["pairs"]) == 2 and data["control"] is not None  # adamw -> qadamw4 per seed, adamw seed 0 -> 1
    p = data["pairs"][0]
    assert (p["a"], p["b"], p["seed_a"], p["seed_b"]) == ("adamw", "qadamw4", 0, 0)
    assert p["path"]["t"][0] == 0.0 and math.isfinite(p["train_barrier"]["height"])
    assert [s["optimizer"] for s in data["surfaces"]] == ["adamw", "qadamw4"] and len(data["surfaces"][0]["coords"]) == 7
    # the path's ends are the solutions themselves: its first train loss is the landscape loss of adamw's solution
    s0 = data["surfaces"][0]
    assert p["path"]["train"][0] == pytest.approx(s0["loss"][3][3], rel=1e-5)
    for name in ("report.md", "landscape_interpolation.png", "landscape_surface.png"):
        assert (out / name).is_file()
    assert "linearly connected" in (out / "report.md").read_text()
    assert main(["landscape", "--quick", "--out", str(out)]) == 0  # finished runs are reused
    assert json.loads((out / "landscape.json").read_text())["pairs"][0]["path"] == p["path"]


@pytest.mark.parametrize("argv,message", [
    (["--optimizers", "adamw"], "at least two"),
    (["--optimizers", "adamw,nosuch"], "unknown optimizer"),
    (["--points", "4"], "odd"),
    (["--model", "digits-cnn"], "LM preset"),
])  # fmt: skip
def test_bad_input_is_a_clear_error(argv, message, tmp_path, capsys):
    assert main(["landscape", "--quick", "--out", str(tmp_path / "x"), *argv]) == 2
    assert message in capsys.readouterr().err
