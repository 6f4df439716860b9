"""The Triton kernels store the same parameters, codes and scales as the CPU path, bit for bit.

Runs the kernels under Triton's interpreter (``TRITON_INTERPRET=1``) on CPU tensors, and again on CUDA when a
GPU is present (``gpu`` mark). Oracles: the C++ kernel (when built), a NumPy transcription of its fp32
arithmetic (always), and for the quantizer and the Lion/SGD steps the PyTorch reference path itself. A
subprocess compiles every kernel for sm_90 without a GPU and checks the PTX keeps IEEE arithmetic.
"""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")

from efficient_optim.kernels.cpu import load_cpu_kernels  # noqa: E402
from efficient_optim.optim.lion import lion_update_  # noqa: E402
from efficient_optim.optim.sgd import sgd_momentum_update_  # noqa: E402
from efficient_optim.quant import dequantize_blockwise, get_map, quantize_blockwise  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["triton_common", "triton_quant", "triton_adamw", "triton_rules", "triton_factored", "triton_adafactor"]
GOLDEN = 0x9E3779B9
F = np.float32


def _load_kernels(interpret: bool):
    """The Triton namespace with kernels built for the interpreter or for CUDA (modules reloaded when they
    were imported in the other mode: ``triton.jit`` picks the mode when a module is imported)."""
    from triton.runtime.interpreter import InterpretedFunction

    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    quant = sys.modules.get("efficient_optim.kernels.triton_quant")
    stale = quant is not None and isinstance(quant._quantize_kernel, InterpretedFunction) != interpret
    for name in MODULES:
        module = importlib.import_module(f"efficient_optim.kernels.{name}")
        if stale:
            importlib.reload(module)
    adamw = sys.modules["efficient_optim.kernels.triton_adamw"]
    adamw._namespace.cache_clear()
    return adamw.triton_kernels()


def skip_without_exact_fma(device) -> None:
    """Lion/SGD use ``tl.fma`` (torch's CPU ops are single-rounding multiply-adds); older Triton interpreters
    evaluate it with two roundings (their C++ helper ``fma_fp32`` is what makes it exact)."""
    from triton._C.libtriton import interpreter

    if device.type == "cpu" and not hasattr(interpreter, "fma_fp32"):
        pytest.skip(f"Triton {triton.__version__}'s interpreter rounds tl.fma twice")


@pytest.fixture(scope="module", params=["interpreter", pytest.param("cuda", marks=pytest.mark.gpu)])
def backend(request):
    """``(kernels, device)``: the interpreter on CPU tensors, or the compiled kernels on CUDA."""
    saved = os.environ.get("TRITON_INTERPRET")
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    kernels = _load_kernels(request.param == "interpreter")
    assert kernels is not None
    yield kernels, torch.device("cpu" if request.param == "interpreter" else "cuda")
    if saved is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = saved


# ----------------------------------------------------------------------------------------------- oracles


def tables(q):
    return ([q.levels, q.lut, q.midpoints, q.mid_lut],
            [q.lut_mantissa_bits, q.lut_exp_range, q.mid_mantissa_bits, q.mid_exp_range], q.signed)  # fmt: skip


def random_state(n, q, block_size, scale_dtype, gen, magnitude=1e-2):
    """Codes and scales of a random state (non-negative for an unsigned map), quantized by the reference."""
    x = torch.randn(n, generator=gen) * magnitude
    x = x if q.signed else x.abs() * magnitude
    return quantize_blockwise(x, q, block_size, "nearest", 0, scale_dtype)


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bit pattern (so that bf16 scales, NaN and -0.0 compare exactly)."""
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()]).cpu()


def assert_same_bits(got: dict, want: dict) -> None:
    for key in want:
        same = torch.equal(bits_of(got[key]), bits_of(want[key]))
        assert same, f"{key}: {(bits_of(got[key]) != bits_of(want[key])).sum().item()} elements differ"


def adamw_spec(p, g, m, v, lr, beta1, beta2, eps, wd, step_size, sqrt_bc2):
    """The C++ kernel's ``adamw_update`` in NumPy float32 (IEEE, one rounding per operation)."""
    p, g, m, v = (t.numpy().astype(F) for t in (p, g, m, v))
    decay, inv = F(1) - F(lr) * F(wd), F(1) / F(sqrt_bc2)
    m = m + (F(1) - F(beta1)) * (g - m)
    v = v * F(beta2) + (F(1) - F(beta2)) * (g * g)
    p = p * decay - F(step_size) * (m / (np.sqrt(v) * inv + F(eps)))
    return torch.from_numpy(p), torch.from_numpy(m), torch.from_numpy(v)


def spec_step(case: dict, state: dict) -> dict:
    """The CPU path of one quantized AdamW step: decode, the C++ arithmetic, the reference encoder."""
    n, bs = case["n"], case["block_size"]
    m = dequantize_blockwise(state["mc"], state["ms"], case["qm"], bs, n)
    v = dequantize_blockwise(state["vc"], state["vs"], case["qv"], bs, n)
    p, m, v = adamw_spec(state["p"], state["g"].float().reshape(-1), m, v, *case["hyper"])
    mc, ms = quantize_blockwise(m, case["qm"], bs, case["m_rounding"], case["m_salt"], state["ms"].dtype)
    vc, vs = quantize_blockwise(v, case["qv"], bs, case["v_rounding"], case["v_salt"], state["vs"].dtype)
    return {"p": p, "mc": mc, "ms": ms, "vc": vc, "vs": vs}


def adamw_case(n, bs, m_bits=8, v_bits=8, m_map="dynamic", v_map="dynamic_nozero", rounding="nearest",
               scale_dtype=torch.bfloat16, step=3, seed=0):  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    qm, qv = get_map(m_map, m_bits, True), get_map(v_map, v_bits, False)
    lr, b1, b2 = 1e-3, 0.9, 0.999
    case = dict(n=n, block_size=bs, qm=qm, qv=qv, m_rounding=rounding, v_rounding=rounding, m_salt=0x1234ABCD,
                v_salt=0xFEDC0001, hyper=(lr, b1, b2, 1e-8, 0.01, lr / (1 - b1**step), math.sqrt(1 - b2**step)))  # fmt: skip
    mc, ms = random_state(n, qm, bs, scale_dtype, gen)
    vc, vs = random_state(n, qv, bs, scale_dtype, gen)
    state = {"p": torch.randn(n, generator=gen), "g": torch.randn(n, generator=gen) * 1e-2, "mc": mc, "ms": ms,
             "vc": vc, "vs": vs}  # fmt: skip
    return case, state


def run_adamw(fn, case, state, device, **kw) -> dict:
    """``fn`` (an AdamW entry point) on copies of ``state`` on ``device`` (the gradient as given when it is
    already there, so its strides are kept); returns the copies."""
    s = {
        k: t if k == "g" and t.device == torch.device(device) else t.clone().to(device)
        for k, t in state.items()
    }
    fn(s["p"], s["g"], s["mc"], s["ms"], *tables(case["qm"]), case["qm"].bits, case["m_rounding"] == "stochastic",
       case["m_salt"], s["vc"], s["vs"], *tables(case["qv"]), case["qv"].bits, case["v_rounding"] == "stochastic",
       case["v_salt"], case["block_size"], *case["hyper"], **kw)  # fmt: skip
    return s


# ------------------------------------------------------------------------------------------------ tests

QUANT_CASES = [  # (map, bits, signed, numel, block size, scale dtype)
    ("dynamic", 8, True, 1000, 256, torch.float32),
    ("dynamic_nozero", 8, False, 37, 7, torch.bfloat16),
    ("softsign", 8, True, 1, 2, torch.bfloat16),
    ("dynamic", 4, True, 301, 10, torch.bfloat16),
    ("sqrt_nozero", 4, False, 129, 128, torch.float32),
    ("linear", 4, True, 0, 64, torch.bfloat16),
    ("linear_nozero", 8, False, 600, 255, torch.float32),
]


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("name,bits,signed,n,bs,sd", QUANT_CASES)
def test_quantizer_matches_reference(backend, name, bits, signed, n, bs, sd, rounding):
    kernels, device = backend
    q = get_map(name, bits, signed)
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3
    x = x if signed else x.abs()
    x[::11] = 0.0
    x[1::13] = -0.0
    want_codes, want_scales = quantize_blockwise(x, q, bs, rounding, 0xDEADBEEF, sd)
    codes = torch.full_like(want_codes, 0xAA, device=device)
    scales = torch.zeros_like(want_scales, device=device)
    kernels.quantize_into(
        x.to(device), codes, scales, *tables(q), bits, rounding == "stochastic", 0xDEADBEEF, bs
    )
    assert_same_bits({"codes": codes, "scales": scales}, {"codes": want_codes, "scales": want_scales})
    out = torch.full((n,), float("nan"), device=device)
    kernels.dequantize_into(codes, scales, q.levels, bits, bs, out)
    assert_same_bits({"out": out}, {"out": dequantize_blockwise(want_codes, want_scales, q, bs, n)})


ADAMW_CASES = [  # numel, block size, options
    (1, 2, {}),
    (1000, 256, {"scale_dtype": torch.float32}),
    (3001, 128, {"m_bits": 4, "v_bits": 4, "v_map": "sqrt_nozero", "rounding": "stochastic"}),
    (301, 10, {"m_bits": 8, "v_bits": 4, "m_map": "softsign", "v_map": "linear_nozero"}),
    (77, 6, {"m_bits": 4, "v_bits": 8, "m_map": "linear", "v_map": "dynamic", "rounding": "stochastic"}),
    (129, 7, {"rounding": "stochastic"}),  # an odd block size (8 bits only)
]


@pytest.mark.parametrize("n,bs,options", ADAMW_CASES)
def test_adamw_step_is_bit_exact(backend, n, bs, options):
    kernels, device = backend
    case, state = adamw_case(n, bs, **options)
    want = spec_step(case, state)
    assert_same_bits(run_adamw(kernels.adamw_quantized_step, case, state, device), want)
    cpu = load_cpu_kernels()
    if cpu is not None and bs % 2 == 0:  # the C++ kernel wants even blocks
        assert_same_bits(run_adamw(cpu.adamw_quantized_step, case, state, "cpu"), want)


def test_adamw_step_takes_strided_and_low_precision_tensors(backend):
    """A non-contiguous or bf16 gradient is read exactly; a strided parameter steps on a copy written back."""
    kernels, device = backend
    case, state = adamw_case(2 * 150, 64, m_bits=4, v_bits=4, v_map="sqrt_nozero", rounding="stochastic")
    wide = (torch.randn(20, 30, generator=torch.Generator().manual_seed(1)) * 1e-2).to(device)
    for grad in (wide[:, ::2], wide.to(torch.bfloat16)[:, 1::2]):
        assert not grad.is_contiguous()
        want = spec_step(case, {**state, "g": grad.cpu().reshape(-1).contiguous()})
        got = run_adamw(kernels.adamw_quantized_step, case, {**state, "g": grad}, device)
        assert_same_bits(got, want)
    strided = torch.zeros(2 * 300, device=device)[::2]
    strided.copy_(state["p"])
    got = run_adamw(kernels.adamw_quantized_step, case, state, device)
    s = {k: t.clone().to(device) for k, t in state.items()}
    kernels.adamw_quantized_step(strided, s["g"], s["mc"], s["ms"], *tables(case["qm"]), 4, True, case["m_salt"],
                                 s["vc"], s["vs"], *tables(case["qv"]), 4, True, case["v_salt"], 64, *case["hyper"])  # fmt: skip
    assert_same_bits(
        {"p": strided, "mc": s["mc"], "vs": s["vs"]}, {"p": got["p"], "mc": got["mc"], "vs": got["vs"]}
    )


def test_multi_tensor_step_is_one_launch_and_equals_single_steps(backend, monkeypatch):
    kernels, device = backend
    import efficient_optim.kernels.triton_adamw as ta

    sizes = [(300, 0), (1, 1), (0, 2), (97, 3), (64, 4), (513, 5)]
    cases = [adamw_case(n, 32, m_bits=4, v_bits=4, v_map="sqrt_nozero", rounding="stochastic", seed=s, step=2 + s)
             for n, s in sizes]  # fmt: skip
    for i, (case, _) in enumerate(cases):
        case["m_salt"], case["v_salt"] = 1000 + i, 0xF0000000 + i
    singles = [run_adamw(kernels.adamw_quantized_step, c, s, device) for c, s in cases]
    states = [{k: t.clone().to(device) for k, t in s.items()} for _, s in cases]
    launches = []
    real = ta.launch
    monkeypatch.setattr(ta, "launch", lambda *a: (launches.append(a[0]), real(*a)))
    c0 = cases[0][0]
    col = lambda key: [s[key] for s in states]  # noqa: E731
    kernels.adamw_quantized_multi_step(
        col("p"), col("g"), col("mc"), col("ms"), *tables(c0["qm"]), 4, True, [c["m_salt"] for c, _ in cases],
        col("vc"), col("vs"), *tables(c0["qv"]), 4, True, [c["v_salt"] for c, _ in cases], 32, *c0["hyper"][:5],
        [c["hyper"][5] for c, _ in cases], [c["hyper"][6] for c, _ in cases])  # fmt: skip
    assert len(launches) == 1
    for got, want in zip(states, singles):
        assert_same_bits(got, want)


def test_found_inf_flag_skips_every_write(backend):
    kernels, device = backend
    case, state = adamw_case(500, 64)
    grads = [torch.ones(10, device=device), state["g"].to(device).clone()]
    flag = torch.zeros(1, dtype=torch.int32, device=device)
    assert kernels.nonfinite_flag(grads, flag).item() == 0
    assert_same_bits(
        run_adamw(kernels.adamw_quantized_step, case, state, device, found_inf=flag), spec_step(case, state)
    )
    grads[1][123] = float("inf")
    assert kernels.nonfinite_flag(grads, flag).item() == 1
    assert kernels.any_nonfinite_f32(grads[1]) and not kernels.any_nonfinite_f32(grads[0])
    assert_same_bits(run_adamw(kernels.adamw_quantized_step, case, state, device, found_inf=flag), state)


def test_sharded_rows_step_like_the_whole_tensor(backend):
    """A dim-0 shard steps its local elements with the salt shifted by its global offset (shard_salt): the
    stochastic codes are those of the unsharded step."""
    kernels, device = backend
    case, state = adamw_case(8 * 48, 48, m_bits=4, v_bits=4, v_map="sqrt_nozero", rounding="stochastic")
    whole = run_adamw(kernels.adamw_quantized_step, case, state, device)
    for first_row, rows in ((0, 3), (3, 5)):
        lo, hi = first_row * 48, (first_row + rows) * 48
        shard = {"p": state["p"][lo:hi], "g": state["g"][lo:hi], "mc": state["mc"][lo // 2:hi // 2],
                 "vc": state["vc"][lo // 2:hi // 2], "ms": state["ms"][lo // 48:hi // 48],
                 "vs": state["vs"][lo // 48:hi // 48]}  # fmt: skip
        shifted = dict(case, n=hi - lo, m_salt=(case["m_salt"] + lo * GOLDEN) & 0xFFFFFFFF,
                       v_salt=(case["v_salt"] + lo * GOLDEN) & 0xFFFFFFFF)  # fmt: skip
        got = run_adamw(kernels.adamw_quantized_step, shifted, shard, device)
        assert_same_bits(got, {"p": whole["p"][lo:hi], "mc": whole["mc"][lo // 2:hi // 2],
                               "ms": whole["ms"][lo // 48:hi // 48]})  # fmt: skip


def factored_spec(case, s):
    """The C++ factored kernel in NumPy: float32 arithmetic, float64 sums in its order."""
    R, C = s["p"].shape
    row, col = s["row"].numpy(), s["col"].numpy()
    total = np.cumsum(row.astype(np.float64))[-1]
    scale = max(F(total / R), F(case["row_eps"]))
    vhat = (row / scale)[:, None] * col[None, :]
    m = dequantize_blockwise(s["mc"], s["ms"], case["q"], case["bs"], R * C).view(R, C)
    p, m, v = adamw_spec(s["p"], s["g"], m, torch.from_numpy(vhat), *case["hyper"])
    v64 = v.numpy().astype(np.float64)
    new_row = (np.cumsum(v64, axis=1)[:, -1] / C).astype(F)
    chunks = [np.cumsum(v64[i : i + 32], axis=0)[-1] for i in range(0, R, 32)]
    new_col = (np.cumsum(np.stack(chunks), axis=0)[-1] / R).astype(F)
    mc, ms = quantize_blockwise(m, case["q"], case["bs"], case["rounding"], case["salt"], s["ms"].dtype)
    return {"p": p, "mc": mc, "ms": ms, "row": torch.from_numpy(new_row), "col": torch.from_numpy(new_col)}


@pytest.mark.parametrize(
    "R,C,bs,bits,rounding",
    [
        (70, 48, 16, 4, "stochastic"),
        (3, 21, 7, 8, "nearest"),
        (1, 2, 2, 8, "stochastic"),
        (33, 40, 10, 4, "nearest"),
    ],
)
def test_factored_step_is_bit_exact(backend, R, C, bs, bits, rounding):
    kernels, device = backend
    gen = torch.Generator().manual_seed(R * C)
    q = get_map("dynamic", bits, True)
    lr, b1, b2, step = 1e-3, 0.9, 0.999, 4
    case = dict(q=q, bs=bs, rounding=rounding, salt=0xABCDEF01, row_eps=1e-30,
                hyper=(lr, b1, b2, 1e-8, 0.01, lr / (1 - b1**step), math.sqrt(1 - b2**step)))  # fmt: skip
    mc, ms = random_state(R * C, q, bs, torch.bfloat16, gen)
    state = {
        "p": torch.randn(R, C, generator=gen),
        "g": torch.randn(R, C, generator=gen) * 1e-2,
        "mc": mc,
        "ms": ms,
        "row": torch.rand(R, generator=gen) * 1e-4,
        "col": torch.rand(C, generator=gen) * 1e-4,
    }
    want = factored_spec(case, state)

    def run(fn, dev):
        s = {k: t.clone().to(dev) for k, t in state.items()}
        fn(s["p"], s["g"], s["mc"], s["ms"], *tables(q), bits, rounding == "stochastic", case["salt"], bs, s["row"],
           s["col"], case["row_eps"], *case["hyper"])  # fmt: skip
        return s

    assert_same_bits(run(kernels.adamw_quantized_factored_step, device), want)
    cpu = load_cpu_kernels()
    if cpu is not None and bs % 2 == 0:
        assert_same_bits(run(cpu.adamw_quantized_factored_step, "cpu"), want)


@pytest.mark.parametrize("rule,bits,rounding,options", [
    ("lion", 8, "nearest", {"beta2": 0.99, "weight_decay": 0.1}),
    ("lion", 4, "stochastic", {"beta2": 0.3, "weight_decay": 0.0}),  # lerp weight >= 0.5: the other formula
    ("sgd", 8, "stochastic", {"nesterov": True, "weight_decay": 1e-2, "first_step": False}),
    ("sgd", 4, "nearest", {"nesterov": False, "weight_decay": 0.0, "first_step": False, "dampening": 0.1}),
    ("sgd", 8, "nearest", {"nesterov": False, "weight_decay": 1e-3, "first_step": True}),
])  # fmt: skip
def test_lion_and_sgd_steps_match_the_reference_path(backend, rule, bits, rounding, options):
    kernels, device = backend
    skip_without_exact_fma(device)
    gen = torch.Generator().manual_seed(bits)
    n, bs, salt = 1037, 64, 0x0BADF00D
    q = get_map("dynamic", bits, True)
    mc, ms = random_state(n, q, bs, torch.bfloat16, gen, magnitude=1e-1)
    p, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen) * 1e-1
    ref_p, m = p.clone(), dequantize_blockwise(mc, ms, q, bs, n)
    if rule == "lion":
        lion_update_(
            ref_p, g, m, lr=1e-2, beta1=0.9, beta2=options["beta2"], weight_decay=options["weight_decay"]
        )
    else:
        step = 1 if options["first_step"] else 5
        sgd_momentum_update_(ref_p, g, m, step=step, lr=1e-2, momentum=0.9, dampening=options.get("dampening", 0.0),
                             weight_decay=options["weight_decay"], nesterov=options["nesterov"])  # fmt: skip
    want_c, want_s = quantize_blockwise(m, q, bs, rounding, salt, torch.bfloat16)
    P, MC, MS = p.to(device), mc.to(device), ms.to(device)
    common = (P, g.to(device), MC, MS, *tables(q), bits, rounding == "stochastic", salt, bs)
    if rule == "lion":
        kernels.lion_quantized_step(*common, 1e-2, 0.9, options["beta2"], options["weight_decay"])
    else:
        kernels.sgd_quantized_step(*common, 1e-2, 0.9, options.get("dampening", 0.0), options["weight_decay"],
                                   options["nesterov"], options["first_step"])  # fmt: skip
    assert_same_bits({"p": P, "mc": MC, "ms": MS}, {"p": ref_p, "mc": want_c, "ms": want_s})


def bf16_weights(n, gen):
    """bf16 weights over every kind of value the rounding sees: zeros of both signs, subnormals, powers of two
    and their neighbours, small and large magnitudes."""
    w = torch.randn(n, generator=gen) * torch.logspace(-30, 30, n, base=2.0)
    w[:8] = torch.tensor(
        [0.0, -0.0, 1e-39, -3e-40, 1.0, -0.5, 2.0**-126, 3.0e30]
    )  # (code * ulp overflows above ~1e34)
    return w.to(torch.bfloat16)


@pytest.mark.parametrize("rule", ["adamw", "lion"])
@pytest.mark.parametrize("mode", ["correction8", "correction16", "stochastic"])
def test_bf16_weights_with_master_match_the_cpu_path(backend, rule, mode):
    """bf16 parameter + correction codes (or stochastic rounding): the CPU path opens the fp32 master
    (``decode_correction``), steps it, and closes it (``encode_correction`` / ``round_stochastic``)."""
    from efficient_optim.optim import master_weights as mw

    kernels, device = backend
    if rule == "lion":
        skip_without_exact_fma(device)
    n, bs, w_salt = 600, 64, 0x5EED5EED
    gen = torch.Generator().manual_seed(7)
    low = bf16_weights(n, gen)
    bits = {"correction8": 8, "correction16": 16}.get(mode)
    code = None if bits is None else torch.randint(-(2 ** (bits - 1)) + 1, 2 ** (bits - 1), (n,), generator=gen,
                                                   dtype={8: torch.int8, 16: torch.int16}[bits])  # fmt: skip
    master = low.float() if code is None else mw.decode_correction(code, low, bits)
    g = (torch.randn(n, generator=gen) * 1e-2).to(torch.bfloat16)
    case, state = adamw_case(n, bs, rounding="stochastic")
    if rule == "adamw":
        want = spec_step(case, {**state, "p": master, "g": g.float()})
        new_master = want["p"]
    else:
        q, m = case["qm"], dequantize_blockwise(state["mc"], state["ms"], case["qm"], bs, n)
        new_master = master.clone()
        lion_update_(new_master, g.float(), m, lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1)
        mc, ms = quantize_blockwise(m, q, bs, "stochastic", case["m_salt"], torch.bfloat16)
        want = {"mc": mc, "ms": ms}
    if code is None:
        want["p"] = mw.round_stochastic(new_master, torch.bfloat16, w_salt)
    else:
        want["p"] = new_master.to(torch.bfloat16)
        want["code"] = mw.encode_correction(new_master, want["p"], bits)
    s = {k: t.clone().to(device) for k, t in state.items()}
    s["p"], s["g"] = low.to(device), g.to(device)
    weight = {"weight_salt": w_salt} if code is None else {"weight_correction": code.to(device)}
    if rule == "adamw":
        got = run_adamw(kernels.adamw_quantized_step, case, s, device, **weight)
    else:
        got = {"p": s["p"], "mc": s["mc"], "ms": s["ms"]}
        kernels.lion_quantized_step(s["p"], s["g"], s["mc"], s["ms"], *tables(case["qm"]), 8, True, case["m_salt"],
                                    bs, 1e-2, 0.9, 0.99, 0.1, **weight)  # fmt: skip
    if code is not None:
        got["code"] = weight["weight_correction"]
    assert_same_bits(got, want)


def test_bad_arguments_are_named(backend):
    kernels, device = backend
    case, state = adamw_case(100, 10)
    with pytest.raises(ValueError, match="block_size"):
        run_adamw(kernels.adamw_quantized_step, dict(case, block_size=1), state, device)
    with pytest.raises(ValueError, match="scales"):
        run_adamw(kernels.adamw_quantized_step, dict(case, block_size=20), state, device)
    with pytest.raises(ValueError, match="p must be fp32"):
        run_adamw(kernels.adamw_quantized_step, case, {**state, "p": state["p"].double()}, device)
    with pytest.raises(ValueError, match="divide the row length"):
        q = case["qm"]
        kernels.adamw_quantized_factored_step(torch.zeros(4, 10, device=device), torch.zeros(4, 10, device=device),
                                              torch.zeros(40, dtype=torch.uint8, device=device),
                                              torch.zeros(10, device=device), *tables(q), 8, False, 0, 4,
                                              torch.zeros(4, device=device), torch.zeros(10, device=device), 1e-30,
                                              *case["hyper"])  # fmt: skip


def test_no_backend_without_interpreter_or_gpu(monkeypatch):
    import efficient_optim.kernels.triton_adamw as ta

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ta.triton_kernels() is None


COMPILE_SCRIPT = r"""
import math, torch
from efficient_optim.kernels import triton_compile as tc, triton_adamw as ta, triton_quant as tq
from efficient_optim.kernels import triton_rules as tr, triton_factored as tf
from efficient_optim.quant import get_map
def tabs(q): return [q.levels, q.lut, q.midpoints, q.mid_lut], [q.lut_mantissa_bits, q.lut_exp_range,
                     q.mid_mantissa_bits, q.mid_exp_range], q.signed
m4, v4, m8 = get_map("dynamic", 4, True), get_map("sqrt_nozero", 4, False), get_map("dynamic", 8, True)
n, p, g, flag = 1000, torch.zeros(1000), torch.zeros(1000), torch.zeros(1, dtype=torch.int32)
c4, c8, sb, sf = (torch.zeros(500, dtype=torch.uint8), torch.zeros(1000, dtype=torch.uint8),
                  torch.zeros(8, dtype=torch.bfloat16), torch.zeros(8))
hyper = (1e-3, 0.9, 0.999, 1e-8, 0.01, 1e-2, 0.3)
with tc.capture() as launches:
    ta.adamw_quantized_step(p, g, c4, sb, *tabs(m4), 4, True, 1, c4, sb, *tabs(v4), 4, False, 2, 128, *hyper,
                            found_inf=flag)
    ta.adamw_quantized_step(p, g, c8, sf, *tabs(m8), 8, False, 1, c8, sf, *tabs(m8), 8, True, 2, 128, *hyper)
    ta.adamw_quantized_multi_step([p, p], [g, g], [c4, c4], [sb, sb], *tabs(m4), 4, True, [1, 2], [c4, c4],
                                  [sb, sb], *tabs(v4), 4, False, [1, 2], 128, *hyper[:5], [1e-2] * 2, [0.3] * 2)
    tq.quantize_into(p, c4, sb, *tabs(m4), 4, True, 1, 128)
    tq.dequantize_into(c8, sf, m8.levels, 8, 128, p)
    tq.nonfinite_flag([g], flag)
    tr.lion_quantized_step(p, g, c8, sb, *tabs(m8), 8, True, 1, 128, 1e-4, 0.9, 0.99, 0.1)
    tr.sgd_quantized_step(p, g, c4, sf, *tabs(m4), 4, False, 1, 128, 1e-2, 0.9, 0.0, 1e-4, True, False)
    tf.adamw_quantized_factored_step(torch.zeros(8, 256), torch.zeros(8, 256), torch.zeros(1024, dtype=torch.uint8),
                                     torch.zeros(16, dtype=torch.bfloat16), *tabs(m4), 4, True, 3, 128,
                                     torch.zeros(8), torch.zeros(256), 1e-30, *hyper)
    pb, corr = torch.zeros(1000, dtype=torch.bfloat16), torch.zeros(1000, dtype=torch.int16)
    ta.adamw_quantized_step(pb, g, c8, sb, *tabs(m8), 8, False, 1, c8, sb, *tabs(m8), 8, False, 2, 128, *hyper,
                            weight_correction=corr)
    ta.adamw_quantized_multi_step([pb, pb], [g, g], [c4, c4], [sb, sb], *tabs(m4), 4, True, [1, 2], [c4, c4],
                                  [sb, sb], *tabs(v4), 4, False, [1, 2], 128, *hyper[:5], [1e-2] * 2, [0.3] * 2,
                                  weight_salts=[3, 4])
    tr.lion_quantized_step(pb, g, c8, sb, *tabs(m8), 8, True, 1, 128, 1e-4, 0.9, 0.99, 0.1, weight_salt=5)
problems = []
for launch in launches:
    name = launch.kernel.fn.__name__
    for issue in tc.check_ptx(tc.compile_launch(launch, arch=90), fma_allowed=name == "_momentum_kernel"):
        problems.append(f"{name}: {issue}")
print(len(launches), "kernels compiled")
assert not problems, problems
"""


def test_every_kernel_compiles_for_sm90_with_ieee_arithmetic():
    """Compile (PTX + cubin, no GPU needed) and check no approximate or contracted arithmetic slipped in."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    if "ptxas" in out.stderr and out.returncode:
        pytest.skip(f"Triton's NVIDIA backend cannot compile here: {out.stderr[-300:]}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "14 kernels compiled" in out.stdout
