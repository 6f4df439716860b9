"""Protocol P3 error decomposition: exactness of the shadows, the decomposition, the verdict, the CLI."""

import json
import math

import pytest
import torch

from efficient_optim.analysis.decomposition import (
    VERDICTS,
    classify,
    codec_kind,
    decompose_errors,
    describe_codec,
    is_exact,
    parse_hybrid_config,
    predictions,
    variant_configs,
)
from efficient_optim.cli import main
from efficient_optim.optim.hybrid_adam import HybridAdam
from efficient_optim.state import Quantized

SOURCES = ("quant", "factor", "both")


def _problem(seed: int = 0):
    """A small MLP whose weight matrices (64x128, 128x64) are large enough to be compressed."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 64))
    x, y = torch.randn(256, 64), torch.randn(256, 64)

    def loss_fn(m, step):
        idx = torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(step))
        return ((m(x[idx]) - y[idx]) ** 2).mean()

    return model, loss_fn


def _compressed(result):
    names = {layer["name"] for layer in result["layers"] if layer["compressed"]}
    return [r for r in result["records"] if r["layer"] in names]


def test_dense_configuration_has_no_error_anywhere():
    model, loss_fn = _problem()
    r = decompose_errors(model, "hybrid_adam+m_codec=fp32+v_codec=fp32", steps=12, every=3, loss_fn=loss_fn)
    assert len(r["records"]) == 4 * len(r["layers"])  # steps 3, 6, 9, 12
    for rec in r["records"]:
        for x in SOURCES:
            assert rec[f"err_{x}"] == pytest.approx(0.0, abs=1e-6)
            assert rec[f"cos_{x}"] == pytest.approx(1.0, abs=1e-6)
    s = r["summary"]
    assert s["compressed_layers"] == 0 and s["aggregated_over"] == "all layers"
    assert all(s[f"mean_err_{x}"] == pytest.approx(0.0, abs=1e-6) for x in SOURCES)
    assert s["verdict"] == "none"


def test_quantized_m_only_all_error_is_quantization():
    model, loss_fn = _problem()
    r = decompose_errors(model, "hybrid_adam+m_codec=4bit+v_codec=fp32", steps=12, every=3, loss_fn=loss_fn)
    compressed = _compressed(r)
    assert compressed
    for rec in r["records"]:
        assert rec["err_factor"] == pytest.approx(0.0, abs=1e-6)
        assert rec["err_quant"] == pytest.approx(rec["err_both"], abs=1e-6)
    assert all(rec["err_quant"] > 1e-3 for rec in compressed)  # 4-bit m really perturbs the direction
    assert r["summary"]["verdict"] == "single_source"
    assert r["summary"]["mean_err_quant"] == pytest.approx(r["summary"]["mean_err_both"], abs=1e-9)


def test_default_hybrid_on_a_small_model_decomposes_both_sources():
    model, loss_fn = _problem()
    r = decompose_errors(model, None, steps=20, every=5, loss_fn=loss_fn)
    big = next(layer for layer in r["layers"] if layer["name"] == "0.weight")
    assert big["codecs"]["dense"] == {"m": "fp32", "v": "fp32"}
    assert big["codecs"]["quant"] == {"m": "4bit", "v": "fp32"}
    assert big["codecs"]["factor"] == {"m": "fp32", "v": "factored"}
    assert big["codecs"]["both"] == {"m": "4bit", "v": "factored"}
    bias = next(layer for layer in r["layers"] if layer["name"] == "0.bias")
    assert not bias["compressed"]
    compressed = _compressed(r)
    assert {rec["layer"] for rec in compressed} == {"0.weight", "2.weight"}
    for rec in compressed:
        for x in SOURCES:
            assert math.isfinite(rec[f"err_{x}"]) and rec[f"err_{x}"] > 0
            assert -1.0 <= rec[f"cos_{x}"] <= 1.0 + 1e-9
        # delta_both = delta_quant + delta_factor + coupling: the triangle inequality must hold
        assert rec["err_both"] <= rec["err_quant"] + rec["err_factor"] + rec["coupling"] + 1e-9
        assert rec["pred_independent"] == pytest.approx(math.hypot(rec["err_quant"], rec["err_factor"]))
    for rec in r["records"]:
        if rec["layer"] == "0.bias":
            assert all(rec[f"err_{x}"] == 0.0 for x in SOURCES)
    s = r["summary"]
    assert s["verdict"] in VERDICTS and s["verdict"] not in ("none", "single_source")
    assert s["best_model"] in s["fit"] and s["points"] == len(compressed)
    assert all(math.isfinite(s[f"mean_err_{x}"]) for x in SOURCES)
    assert s["verdict_text"]
    json.dumps(r)  # JSON-ready


def test_adamw_trajectory_is_torch_adamw():
    """The dense shadow's direction, applied by the trajectory, is exactly AdamW (no weight-decay leak)."""
    model, loss_fn = _problem()
    ref, _ = _problem()
    decompose_errors(model, None, steps=8, every=4, loss_fn=loss_fn, lr=1e-2, weight_decay=0.1)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(1, 9):
        opt.zero_grad()
        loss_fn(ref, step).backward()
        opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_hybrid_trajectory_is_the_hybrid_adam_run():
    model, loss_fn = _problem()
    ref, _ = _problem()
    decompose_errors(model, "hybrid_adam+m_codec=8bit", steps=6, every=3, loss_fn=loss_fn, lr=1e-2,
                     weight_decay=0.1, trajectory="hybrid")  # fmt: skip
    opt = HybridAdam(ref.parameters(), lr=1e-2, weight_decay=0.1, m_codec="8bit")
    for step in range(1, 7):
        opt.zero_grad()
        loss_fn(ref, step).backward()
        opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_variants_split_any_combination():
    v = variant_configs({"m_codec": "lowrank", "v_codec": "4bit", "rank": 4, "seed": 3})
    assert (v["dense"]["m_codec"], v["dense"]["v_codec"]) == ("fp32", "fp32")
    assert (v["quant"]["m_codec"], v["quant"]["v_codec"]) == ("fp32", "4bit")
    assert (v["factor"]["m_codec"], v["factor"]["v_codec"]) == ("lowrank", "fp32")
    assert (v["both"]["m_codec"], v["both"]["v_codec"]) == ("lowrank", "4bit")
    assert all(c["seed"] == 3 for c in v.values())
    # options only a replaced codec uses are dropped (HybridAdam refuses an option with no effect)
    assert [c.get("rank") for c in v.values()] == [None, None, 4, 4]
    v = variant_configs({"m_codec": "4bit", "v_codec": "factored", "m_map": "linear", "m_block_size": 64,
                         "rounding": "stochastic"})  # fmt: skip
    assert [c.get("m_map") for c in v.values()] == [None, "linear", None, "linear"]
    assert [c.get("m_block_size") for c in v.values()] == [None, 64, None, 64]
    assert [c.get("rounding") for c in v.values()] == [None, "stochastic", None, "stochastic"]
    assert codec_kind(Quantized(bits=8)) == "quant" and codec_kind("factored") == "factor"
    assert parse_hybrid_config("m_codec=8bit+beta2=0.99")["betas"] == (0.9, 0.99)


def test_a_configuration_with_options_of_one_codec_runs():
    # rank and v's map belong to the lowrank m and the 8-bit v: the shadows that replace them drop them
    model, loss_fn = _problem()
    r = decompose_errors(model, "hybrid_adam+m_codec=lowrank+v_codec=8bit+rank=4+v_map=linear_nozero", steps=3,
                         every=3, loss_fn=loss_fn)  # fmt: skip
    layer = next(x for x in r["layers"] if x["name"] == "0.weight")
    assert layer["codecs"]["both"] == {"m": "lowrank(r=4)", "v": "8bit"}
    assert not {"rank", "v_map"} & set(r["variants"]["dense"]) and r["variants"]["both"]["rank"] == 4
    assert r["summary"]["measured_steps"] == 1


def test_codecs_describe_themselves_for_the_decomposition():
    from efficient_optim.state import Dense, Factored
    from efficient_optim.state.corrected import ErrorCorrected
    from efficient_optim.state.error_feedback import ErrorFeedback
    from efficient_optim.state.learned import LearnedQuantized
    from efficient_optim.state.lowrank import LowRank

    matrix, vector = torch.zeros(128, 64), torch.zeros(8192)
    # codec -> (source of error, name on a matrix, name on a vector, exact on the vector)
    cases = {
        Dense(): ("dense", "fp32", "fp32", True),
        Dense(torch.bfloat16): ("quant", "bf16", "bf16", False),
        Quantized(bits=4): ("quant", "4bit", "4bit", False),
        LearnedQuantized(bits=4): ("quant", "4bit-learned", "4bit-learned", False),
        Factored(): ("factor", "factored", "fp32", True),
        LowRank(rank=4): ("factor", "lowrank(r=4)", "fp32", True),
        ErrorCorrected(Quantized(bits=4)): ("quant", "4bit (ErrorCorrected)", "4bit (ErrorCorrected)", False),
        ErrorFeedback(LowRank(rank=4)): ("factor", "lowrank(r=4) (ErrorFeedback)", "fp32 (ErrorFeedback)", True),
    }
    for codec, (kind, on_matrix, on_vector, exact) in cases.items():
        assert codec_kind(codec) == kind, codec
        assert (describe_codec(codec, matrix), describe_codec(codec, vector)) == (on_matrix, on_vector), codec
        assert is_exact(codec, vector) == exact and is_exact(codec, matrix) == (kind == "dense"), codec
    with pytest.raises(ValueError, match="unknown codec 'int3'"):
        codec_kind("int3")


@pytest.mark.parametrize(
    "combine,verdict",
    [
        (lambda q, f: q + f, "additive"),
        (lambda q, f: math.hypot(q, f), "independent"),
        (lambda q, f: (1 + q) * (1 + f) - 1, "multiplicative"),
        (lambda q, f: 0.6 * max(q, f), "subadditive"),
        (lambda q, f: 2.0 * ((1 + q) * (1 + f) - 1), "supermultiplicative"),
    ],
)
def test_classify_recognizes_each_way_of_combining(combine, verdict):
    pts = [(q, f, combine(q, f)) for q in (0.3, 0.6, 1.0) for f in (0.4, 0.8, 1.5)]
    out = classify(pts)
    assert out["verdict"] == verdict and out["points"] == 9
    assert out["distinguishable"] is True


def test_classify_without_two_active_sources():
    assert classify([(0.0, 0.0, 0.0)])["verdict"] == "none"
    assert classify([(0.2, 0.0, 0.2)])["verdict"] == "single_source"
    p = predictions(0.1, 0.2)
    assert p["multiplicative"] == pytest.approx(0.32) and p["linear"] == pytest.approx(0.3)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"config": "adamw"}, "unknown spec"),
        ({"config": "hybrid_adam+m_codec=3bit"}, "m_codec"),
        ({"config": "hybrid_adam+frobnicate=1"}, "invalid HybridAdam option"),
        ({"steps": 0}, "steps must be"),
        ({"every": 0}, "every must be"),
        ({"trajectory": "sgd"}, "trajectory"),
        ({"loss_fn": None}, "loss_fn"),
    ],
)
def test_bad_input_is_a_clear_value_error(kwargs, message):
    model, loss_fn = _problem()
    args = {"config": None, "steps": 2, "every": 1, "loss_fn": loss_fn, **kwargs}
    with pytest.raises(ValueError, match=message):
        decompose_errors(model, args.pop("config"), args.pop("steps"), args.pop("every"), **args)


def test_cli_runs_end_to_end(tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("to be or not to be, that is the question. " * 400)
    out = tmp_path / "p3"
    rc = main(["decompose", "--data", str(text), "--steps", "4", "--every", "2", "--layers", "1", "--width", "64",
               "--ctx", "32", "--batch", "4", "--device", "cpu", "--quiet", "--out", str(out)])  # fmt: skip
    assert rc == 0
    for name in ("decomposition.json", "decomposition.png", "decomposition.md"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    result = json.loads((out / "decomposition.json").read_text())
    assert result["summary"]["verdict"] in VERDICTS
    assert [r["step"] for r in result["steps"]] == [2, 4]
    assert result["command"].startswith("effopt decompose")
    assert "Verdict" in (out / "decomposition.md").read_text()
    assert "verdict:" in capsys.readouterr().out


def test_cli_bad_spec_exits_2(capsys):
    assert main(["decompose", "--spec", "qadamw4", "--steps", "2"]) == 2
    assert "unknown spec" in capsys.readouterr().err
