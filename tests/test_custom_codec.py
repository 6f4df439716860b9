"""A codec defined here, outside the package, works wherever a built-in codec does, with no change to the
package: ``HybridAdam(m_codec=...)``, ``state_bytes``, weights-only checkpoints (bit-identical resume), the
probes (``analysis.StateProbe``), the error decomposition (``analysis.decomposition``) and FSDP2 (its state
kept whole on every rank by the default ``for_dtensor``). The codec implements only ``StateCodec``'s four
abstract methods; everything else is the base class's default. It is also the example of "How to add a
codec" (docs/architecture.md), checked to be the same code and to run.

Run as a script, ``python tests/test_custom_codec.py RANK WORLD STORE_FILE OUT_DIR``, this file is one rank
of the 2-process FSDP2 check (launched by ``test_distributed.launch``, with its hard timeout).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import sys
import traceback
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # the package, as a script

import efficient_optim as eo  # noqa: E402
from efficient_optim.analysis import StateProbe, decoded_states, decompose_errors  # noqa: E402
from efficient_optim.analysis.decomposition import codec_kind, describe_codec, variant_configs  # noqa: E402
from efficient_optim.state import StateCodec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ScaledHalf(StateCodec):
    """A state in float16 after division by one float32 scale per tensor (its absmax / ``peak``)."""

    peak: float = 1024.0

    def init(self, state, name, param):
        state[f"{name}.half"] = torch.zeros(param.shape, dtype=torch.float16, device=param.device)
        state[f"{name}.scale"] = torch.ones((), dtype=torch.float32, device=param.device)

    def decode(self, state, name, param):
        return state[f"{name}.half"].float() * state[f"{name}.scale"]

    def encode(self, state, name, value, *, salt=0):
        absmax = value.abs().max().float()
        scale = torch.where(absmax > 0, absmax / self.peak, torch.ones_like(absmax))
        state[f"{name}.scale"].copy_(scale)
        state[f"{name}.half"].copy_((value / scale).half())

    def expected(self, name, param):
        return {f"{name}.half": (tuple(param.shape), torch.float16), f"{name}.scale": ((), torch.float32)}


def _problem(seed: int = 0):
    """An MLP whose weight matrices (128x64, 64x128: 8192 elements) are compressed; biases stay fp32."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 64))
    x, y = torch.randn(256, 64), torch.randn(256, 64)

    def loss_fn(m, step):
        idx = torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(step))
        return ((m(x[idx]) - y[idx]) ** 2).mean()

    return model, loss_fn


def _train(model, opt, loss_fn, steps: int, start: int = 1) -> list[float]:
    losses = []
    for step in range(start, start + steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, step)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_hybrid_adam_stores_m_through_the_codec_and_state_bytes_counts_it():
    model, loss_fn = _problem()
    opt = eo.HybridAdam(model.parameters(), lr=1e-2, m_codec=ScaledHalf())
    losses = _train(model, opt, loss_fn, 20)
    ref_model, _ = _problem()
    ref = eo.HybridAdam(ref_model.parameters(), lr=1e-2, m_codec="fp32")
    ref_losses = _train(ref_model, ref, loss_fn, 20)
    w = model[0].weight
    assert opt.state[w]["exp_avg.half"].dtype == torch.float16 and opt.state[w]["exp_avg.half"].shape == w.shape
    assert "exp_avg.half" not in opt.state[model[0].bias]  # small tensors keep fp32 moments
    assert losses[-1] < 0.8 * losses[0]
    assert losses[-1] == pytest.approx(ref_losses[-1], rel=1e-2)  # fp16 m: AdamW's run up to rounding
    # exactly 2 bytes per element less than an fp32 m, plus the 4-byte scale, on the two compressed matrices
    saved = sum(p.numel() * 2 - 4 for p in model.parameters() if p.numel() >= 4096)
    assert eo.state_bytes(ref) - eo.state_bytes(opt) == saved
    assert ScaledHalf().nbytes(opt.state[w], "exp_avg") == w.numel() * 2 + 4


def test_checkpoint_loads_weights_only_and_resumes_bit_identically(tmp_path):
    model, loss_fn = _problem()
    opt = eo.HybridAdam(model.parameters(), lr=1e-2, m_codec=ScaledHalf())
    _train(model, opt, loss_fn, 3)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    _train(model, opt, loss_fn, 4, start=4)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model2, _ = _problem(seed=1)
    model2.load_state_dict(ckpt["model"])
    opt2 = eo.HybridAdam(model2.parameters(), lr=1e-2, m_codec=ScaledHalf())  # an equal instance, not the same
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.state[model2[0].weight]["exp_avg.half"].dtype == torch.float16  # not cast to the param dtype
    _train(model2, opt2, loss_fn, 4, start=4)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    for p, q in zip(model.parameters(), model2.parameters()):
        for key, t in opt.state[p].items():
            assert torch.equal(t, opt2.state[q][key]), key


def test_probes_decode_the_codec_and_measure_its_error():
    model, loss_fn = _problem()
    opt = eo.HybridAdam(model.parameters(), lr=1e-2, m_codec=ScaledHalf())
    with StateProbe(opt, model.named_parameters(), every=5, early=0) as probe:
        _train(model, opt, loss_fn, 10)
    w, group = model[0].weight, opt.param_groups[0]
    assert torch.equal(decoded_states(opt, w, group)["exp_avg"], ScaledHalf().decode(opt.state[w], "exp_avg", w))
    recs = [r for r in probe.records if r["kind"] == "state" and r["param"] == "0.weight" and r["state"] == "exp_avg"]
    assert [r["step"] for r in recs] == [5, 10]
    # against the exact fp32 shadow: an fp16-sized error (half an fp16 step is 2^-11 = 4.9e-4 relative; observed
    # 3.4e-4 and 4.0e-4), neither zero (the state really went through the codec) nor large
    assert all(1e-4 < r["err_rel_l2"] < 2e-3 for r in recs), [r["err_rel_l2"] for r in recs]
    assert not {"residual_norm", "levels"} & set(recs[-1])  # the defaults: no residual, no codebook


def test_error_decomposition_describes_and_classifies_the_codec():
    w = torch.zeros(128, 64)
    assert ScaledHalf().error_kind == "quantization" and codec_kind(ScaledHalf()) == "quant"
    assert describe_codec(ScaledHalf(), w) == "ScaledHalf"
    model, loss_fn = _problem()
    r = decompose_errors(model, {"m_codec": ScaledHalf(), "v_codec": "factored"}, steps=6, every=3, loss_fn=loss_fn)
    layer = next(x for x in r["layers"] if x["name"] == "0.weight")
    assert layer["codecs"]["both"] == {"m": "ScaledHalf", "v": "factored"}
    assert layer["codecs"]["quant"] == {"m": "ScaledHalf", "v": "fp32"}
    assert layer["codecs"]["factor"] == {"m": "fp32", "v": "factored"}
    assert layer["compressed"] and layer["quant_active"]
    recs = [x for x in r["records"] if x["layer"] == "0.weight"]
    assert [x["step"] for x in recs] == [3, 6] and all(x["err_quant"] > 0 for x in recs)


def test_what_a_codec_says_of_itself_decides_its_source_of_error():
    @dataclass(frozen=True)
    class ScaledHalfSaysLowRank(ScaledHalf):
        @property
        def error_kind(self):
            return "lowrank"

    @dataclass(frozen=True)
    class ScaledHalfSaysNonsense(ScaledHalf):
        @property
        def error_kind(self):
            return "rounding"

    codec = ScaledHalfSaysLowRank()
    assert codec_kind(codec) == "factor"
    v = variant_configs({"m_codec": codec, "v_codec": "8bit"})
    assert v["factor"]["m_codec"] is codec and v["factor"]["v_codec"] == "fp32"
    assert v["quant"]["m_codec"] == "fp32" and v["quant"]["v_codec"] == "8bit"
    with pytest.raises(ValueError, match="error_kind is 'rounding'"):
        codec_kind(ScaledHalfSaysNonsense())


def test_the_howto_example_is_this_codec_and_runs():
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text[text.index("## How to add a codec") :]
    end = section.find("\n## ")  # the next section, if any
    section = section if end < 0 else section[:end]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert inspect.getsource(ScaledHalf) in block  # the documented codec is the one tested here
    module = types.ModuleType("howto_example")  # a dataclass looks its module up in sys.modules
    sys.modules[module.__name__] = module
    try:
        exec(compile(block, "howto_example", "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]
    model, opt = module.model, module.opt
    model(torch.randn(4, 128)).square().sum().backward()
    opt.step()
    assert opt.state[model.weight]["exp_avg.half"].shape == model.weight.shape
    for name in re.findall(r"^\| `(\w+)", section, re.M):  # every property / method the table names exists
        assert hasattr(StateCodec, name), name


# ------------------------------------------------------------------------------------ FSDP2, 2 processes
def _distributed_available() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_gloo_available()


@pytest.mark.dist
@pytest.mark.skipif(not _distributed_available(), reason="torch.distributed with gloo is not available")
@pytest.mark.timeout(360)
def test_fsdp2_keeps_the_state_whole_on_every_rank_and_matches_one_process(tmp_path):
    from test_distributed import LR, launch

    res = launch(tmp_path, worker=Path(__file__), timeout=300)["results"]["fsdp/scaled_half"]
    assert set(res) != {"error"}, res.get("error")
    # the default for_dtensor: Replicated, the whole state on every rank, with a one-time warning
    assert res["codec"] == "Replicated"
    assert any("ScaledHalf has no sharded implementation" in w for w in res["warnings"]), res["warnings"]
    st = res["states"]["0.weight"]  # 96 x 64, rows sharded over 2 ranks
    assert st["exp_avg.half"] == ["Tensor", [96, 64]] and st["exp_avg.scale"] == ["Tensor", []]
    assert st["exp_avg_sq.row"] == ["DTensor", [48]]  # the factored v keeps its own sharded layout
    # the global tensor's state: one process's numbers up to the order of the gradient average, which can flip
    # the fp16 rounding of an element on a rounding boundary: that element's update moves by ~2^-11 of its
    # size (observed 5e-6 after 6 steps of lr 3e-3, in 0.06 % of the elements)
    assert res["vs_ref"]["max_abs"] < LR / 100, res["vs_ref"]
    assert res["losses"] == pytest.approx(res["ref_losses"], rel=1e-4)


def _fsdp_scenario(rank: int, world: int, mesh) -> dict:
    import dist_worker as dw

    data = dw.batches()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = dw.fsdp(dw.make_model(), mesh)
        opt = eo.HybridAdam(model.parameters(), lr=dw.LR, m_codec=ScaledHalf())
        losses = dw.train(model, opt, data, rank, world)
    ref = dw.make_model()
    ref_losses = dw.train(ref, eo.HybridAdam(ref.parameters(), lr=dw.LR, m_codec=ScaledHalf()), data)
    w = next(model.parameters())
    return {"losses": losses, "ref_losses": ref_losses, "vs_ref": dw.compare(dw.full_params(model), dw.full_params(ref)),
            "states": dw.state_summary(model, opt), "codec": type(opt.codecs(w, opt.param_groups[0])["exp_avg"]).__name__,
            "warnings": [str(c.message) for c in caught]}  # fmt: skip


def _rank_main(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        result = _fsdp_scenario(rank, world, init_device_mesh("cpu", (world,)))
    except BaseException:
        result = {"error": traceback.format_exc()}
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        tmp = os.path.join(out, "results.json.tmp")
        with open(tmp, "w") as f:
            json.dump({"results": {"fsdp/scaled_half": result}}, f)
        os.replace(tmp, os.path.join(out, "results.json"))


if __name__ == "__main__":
    _rank_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
