"""Adafactor's fused factored step: the Triton kernel stores the same bits as its CPU transcription.

The kernel (``kernels/triton_adafactor.py``) runs under Triton's interpreter (``TRITON_INTERPRET=1``) on CPU
tensors and, when a GPU is present, on CUDA; the oracle is ``kernels/adafactor_order.py`` (torch + NumPy, the
same operations in the same order), which ``Adafactor(fused=True)`` runs on the CPU. The fixed-order
arithmetic differs from the reference path (torch means and norms) by float rounding only: measured here.
A subprocess compiles every kernel specialization for sm_90 without a GPU and checks the PTX.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import efficient_optim as eo  # noqa: E402
from efficient_optim.kernels import adafactor_order, dispatch  # noqa: E402
from efficient_optim.kernels.adafactor_order import AdafactorScalars  # noqa: E402
from efficient_optim.quant import get_map, quantize_blockwise  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=["interpreter", pytest.param("cuda", marks=pytest.mark.gpu)])
def backend(request):
    """``(kernels, device)``: the interpreted kernels on CPU tensors, or the compiled ones on CUDA."""
    from test_triton_kernels import _load_kernels

    saved = os.environ.get("TRITON_INTERPRET")
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    kernels = _load_kernels(request.param == "interpreter")
    yield kernels, torch.device("cpu" if request.param == "interpreter" else "cuda")
    if saved is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = saved


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().cpu().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


class _QuantizedM:
    """A block-quantized first moment with the codec interface ``adafactor_order`` uses."""

    kernel_kind = "quantized"

    def __init__(self, bits: int, block_size: int, rounding: str):
        self.q, self.bits, self.block_size, self.rounding = get_map("dynamic", bits, True), bits, block_size, rounding

    def decode(self, state, name, p):
        from efficient_optim.quant import dequantize_blockwise

        return dequantize_blockwise(state["mc"], state["ms"], self.q, self.block_size, p.numel()).view(p.shape)

    def encode(self, state, name, value, salt):
        mc, ms = quantize_blockwise(value.reshape(-1), self.q, self.block_size, self.rounding, salt, torch.bfloat16)
        state["mc"].copy_(mc)
        state["ms"].copy_(ms)

    def operands(self, state):
        q = self.q
        return (state["mc"], state["ms"], [q.levels, q.lut, q.midpoints, q.mid_lut],
                [q.lut_mantissa_bits, q.lut_exp_range, q.mid_mantissa_bits, q.mid_exp_range], q.signed, self.bits,
                self.rounding == "stochastic", self.block_size)  # fmt: skip


CASES = [  # (R, C, first moment, options)
    (70, 300, None, {}),
    (33, 257, ("quantized", 8, 7, "stochastic"), {"weight_decay": 0.1}),  # odd block (8 bits), tails
    (1, 5, None, {"scale_parameter": False}),  # one row
    (5, 1, ("dense",), {}),  # one column
    (40, 64, ("quantized", 4, 64, "nearest"), {"strided_grad": True}),
    (9, 300, None, {"bf16_grad": True, "clip_threshold": 1e-3}),  # clipping active
]


@pytest.mark.parametrize("R,C,moment,options", CASES)
def test_kernel_stores_the_bits_of_the_fixed_order_transcription(backend, R, C, moment, options):
    kernels, device = backend
    gen = torch.Generator().manual_seed(R * 1000 + C)
    p = torch.randn(R, C, generator=gen)
    g = torch.randn(R, C, generator=gen) * 1e-2
    if options.get("bf16_grad"):
        g = g.bfloat16()
    row, col = torch.rand(R, generator=gen) * 1e-4, torch.rand(C, generator=gen) * 1e-4
    beta1 = None if moment is None else 0.9
    hp = AdafactorScalars(rel=1e-2, eps1=1e-30, eps2=1e-3, clip_threshold=options.get("clip_threshold", 1.0),
                          beta2t=0.3, beta1=beta1, weight_decay=options.get("weight_decay", 0.0),
                          scale_parameter=options.get("scale_parameter", True), m_salt=0x5EED1234)  # fmt: skip
    state = {"p": p, "g": g, "row": row, "col": col}
    codec = None
    if moment is not None and moment[0] == "quantized":
        codec = _QuantizedM(*moment[1:])
        m0 = torch.randn(R * C, generator=gen) * 1e-3
        state["mc"], state["ms"] = quantize_blockwise(m0, codec.q, codec.block_size, "nearest", 0, torch.bfloat16)
    elif moment is not None:
        state["m"] = torch.randn(R, C, generator=gen) * 1e-3

    want = {k: t.clone() for k, t in state.items()}
    dense = types.SimpleNamespace(decode=lambda s, n, p: s["m"].clone(), encode=lambda s, n, v, salt: s["m"].copy_(v))
    adafactor_order.adafactor_factored_step(want["p"], want["g"], want["row"], want["col"], 1e-30, hp,
                                            codec or dense, want)  # fmt: skip
    got = {k: t.clone().to(device) for k, t in state.items()}
    grad = got["g"].t().contiguous().t() if options.get("strided_grad") else got["g"]
    extra = {}
    if codec is not None:
        extra["m_quantized"] = codec.operands(got)
    elif "m" in got:
        extra["m_dense"] = got["m"]
    kernels.adafactor_factored_step(got["p"], grad, got["row"], got["col"], 1e-30, hp, **extra)
    assert not torch.equal(want["p"], p), "the step changed the parameter"
    for key in want:
        diff = (_bits(got[key]) != _bits(want[key])).sum().item()
        assert diff == 0, f"{key}: {diff} elements differ"


def _run(make, steps=4, dtype=torch.float32):
    torch.manual_seed(0)
    shapes = ((48, 96), (1, 40), (40, 1), (30,), (2, 3, 8))
    params = [torch.nn.Parameter((torch.randn(s) * 0.02).to(dtype)) for s in shapes]
    opt = make(params)
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i)).to(dtype)
        opt.step()
    return [p.detach().clone() for p in params], opt


MAKERS = {
    "default": lambda fused: lambda ps: eo.Adafactor(ps, fused=fused),
    "m8_stochastic_wd": lambda fused: lambda ps: eo.Adafactor(ps, beta1=0.9, m_bits=8, rounding="stochastic",
                                                              min_quantize_numel=0, weight_decay=0.01, fused=fused),
    "m32_lr": lambda fused: lambda ps: eo.Adafactor(ps, lr=1e-3, relative_step=False, beta1=0.9, fused=fused),
}


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_adafactor_steps_through_the_kernel_with_the_cpu_fused_bits(name, monkeypatch):
    """With the interpreted Triton kernels as the provider, Adafactor (``fused=None``) stores exactly what
    ``Adafactor(fused=True)`` stores on the CPU (the transcription): parameters and every state."""
    from test_triton_kernels import _load_kernels

    expected, ref_opt = _run(MAKERS[name](True))
    triton = _load_kernels(interpret=True)
    calls = []
    namespace = types.SimpleNamespace(**{k: getattr(triton, k) for k in dir(triton) if not k.startswith("_")})
    namespace.adafactor_factored_step = lambda *a, **kw: (calls.append(a[0].shape), triton.adafactor_factored_step(*a, **kw))  # noqa: E501
    monkeypatch.setitem(dispatch.PROVIDERS, "cpu", lambda: namespace)
    got, opt = _run(MAKERS[name](None))
    assert sorted(set(calls)) == [(1, 40), (40, 1), (48, 96)]  # the matrices; the vector and the 3-D tensor not
    for a, b in zip(expected, got):
        assert torch.equal(a, b)
    for p_ref, p in zip(ref_opt.state, opt.state):
        for key, t in ref_opt.state[p_ref].items():
            assert torch.equal(t, opt.state[p][key]), key


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_fixed_order_arithmetic_is_the_reference_to_float_rounding(name):
    """``fused=True`` (fixed order) against the reference path (torch means/norms): the parameters after four
    steps agree to float rounding (measured: at most 1e-4 of the distance moved, about 4 ulps of the weights
    when the steps are small next to them)."""
    fixed, _ = _run(MAKERS[name](True))
    reference, _ = _run(MAKERS[name](False))
    default, _ = _run(MAKERS[name](None))
    start, _ = _run(MAKERS[name](False), steps=0)
    for a, b, c, p0 in zip(fixed, reference, default, start):
        assert torch.equal(b, c)  # on the CPU the default is the reference path (the golden trajectories)
        moved = (b - p0).abs().max().item()
        ulps = 4 * torch.finfo(torch.float32).eps * p0.abs().max().item()
        assert (a - b).abs().max().item() <= 1e-5 * moved + ulps, (a - b).abs().max().item() / moved


def test_an_empty_matrix_takes_the_reference_path():
    for fused in (True, False):
        empty, q = torch.nn.Parameter(torch.zeros(0, 5)), torch.nn.Parameter(torch.ones(3, 4))
        opt = eo.Adafactor([empty, q], fused=fused)
        empty.grad, q.grad = torch.zeros_like(empty), torch.full((3, 4), 0.5)
        opt.step()
        assert empty.shape == (0, 5) and torch.isfinite(q).all() and not torch.equal(q, torch.ones(3, 4))


def test_bf16_weights_through_a_master_take_the_kernel_on_the_master():
    got, _ = _run(lambda ps: eo.Adafactor(ps, correction_bits=16, fused=True), dtype=torch.bfloat16)
    ref, _ = _run(lambda ps: eo.Adafactor(ps, correction_bits=16, fused=False), dtype=torch.bfloat16)
    for a, b in zip(got, ref):
        assert a.dtype == torch.bfloat16 and (a.float() - b.float()).abs().max().item() < 1e-2


def test_bad_arguments_are_named(backend):
    kernels, device = backend
    p, g = torch.zeros(4, 8, device=device), torch.zeros(4, 8, device=device)
    row, col = torch.zeros(4, device=device), torch.zeros(8, device=device)
    hp = AdafactorScalars(1e-2, 1e-30, 1e-3, 1.0, 0.5, 0.9, 0.0, True)
    with pytest.raises(ValueError, match="first moment"):
        kernels.adafactor_factored_step(p, g, row, col, 1e-30, hp)
    with pytest.raises(ValueError, match="row"):
        kernels.adafactor_factored_step(p, g, col, row, 1e-30, AdafactorScalars(1e-2, 1e-30, 1e-3, 1.0, 0.5, None, 0.0, True))
    with pytest.raises(ValueError, match="fused"):
        eo.Adafactor([torch.nn.Parameter(torch.zeros(2, 2))], fused="yes")


COMPILE_SCRIPT = r"""
import re, torch
from efficient_optim.kernels import triton_compile as tc, triton_adafactor as tfa
from efficient_optim.kernels.adafactor_order import AdafactorScalars
from efficient_optim.quant import get_map
q = get_map("dynamic", 4, True)
tabs = ([q.levels, q.lut, q.midpoints, q.mid_lut], [q.lut_mantissa_bits, q.lut_exp_range, q.mid_mantissa_bits,
        q.mid_exp_range], q.signed)
R, C = 40, 300
p, g, row, col = torch.zeros(R, C), torch.zeros(R, C, dtype=torch.bfloat16), torch.zeros(R), torch.zeros(C)
codes, scales = torch.zeros(R * C // 2, dtype=torch.uint8), torch.zeros(R * C // 128 + 1, dtype=torch.bfloat16)
with tc.capture() as launches:
    tfa.adafactor_factored_step(p, g, row, col, 1e-30, AdafactorScalars(1e-2, 1e-30, 1e-3, 1.0, 0.5, None, 0.01, True))
    tfa.adafactor_factored_step(p, g, row, col, 1e-30, AdafactorScalars(1e-2, 1e-30, 1e-3, 1.0, 0.5, 0.9, 0.0, False),
                                m_quantized=(codes, scales, *tabs, 4, True, 128))
    tfa.adafactor_factored_step(p, p, row, col, 1e-30, AdafactorScalars(1e-2, 1e-30, 1e-3, 1.0, 0.5, 0.9, 0.0, True),
                                m_dense=torch.zeros(R, C))
problems = []
for launch in launches:
    ptx = tc.compile_launch(launch, arch=90)
    name = launch.kernel.fn.__name__
    problems += [f"{name}: {issue}" for issue in tc.check_ptx(ptx, fma_allowed=False)]
    if re.search(r"\bfma\.rn\.f64\b", ptx):
        problems.append(f"{name}: contracted fma.rn.f64")
print(len(launches), "kernels compiled")
assert not problems, problems
"""


def test_adafactor_kernels_compile_for_sm90_with_ieee_arithmetic():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    if "ptxas" in out.stderr and out.returncode:
        pytest.skip(f"Triton's NVIDIA backend cannot compile here: {out.stderr[-300:]}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "18 kernels compiled" in out.stdout
