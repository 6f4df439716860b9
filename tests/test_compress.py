"""Gradient compressors: exact byte accounting, wire format, error bounds, error feedback and DGC."""

from __future__ import annotations

import io

import pytest
import torch

from efficient_optim.compress import DGC, ErrorFeedback, NoFeedback, Quantize, RandomK, TopK
from efficient_optim.compress.quantize import map_2bit, pack_2bit, unpack_2bit
from efficient_optim.quant import dequantize_blockwise, get_map, quantize_blockwise

COMPRESSORS = [
    Quantize(32), Quantize(16), Quantize(16, rounding="stochastic"), Quantize(8), Quantize(8, map="dynamic"),
    Quantize(8, scale_dtype="bfloat16"), Quantize(4), Quantize(4, block_size=32, map="linear"), Quantize(2),
    Quantize(2, map="linear", rounding="stochastic"), Quantize(2, block_size=6), TopK(0.01), TopK(0.3, values=Quantize(8)),
    RandomK(0.1), RandomK(0.5, values=Quantize(16), rescale=False),
]  # fmt: skip
NUMELS = [1, 7, 128, 1000, 5003]


def heavy_tailed(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * torch.rand(n, generator=g).pow(4) * 3


@pytest.mark.parametrize("comp", COMPRESSORS, ids=repr)
def test_bytes_are_exact_and_the_wire_round_trips(comp):
    for n in NUMELS:
        x = heavy_tailed(n).view(-1, 1) if n % 2 else heavy_tailed(n)
        p = comp.compress(x, salt=5)
        layout = comp.layout(n)
        assert list(p.tensors) == list(layout)
        for name, (shape, dtype) in layout.items():
            assert tuple(p.tensors[name].shape) == shape and p.tensors[name].dtype == dtype, name
        assert p.nbytes == comp.nbytes(n)
        out = comp.decompress(p)
        assert out.shape == x.shape and out.dtype == torch.float32
        wire = comp.to_wire(p)
        assert wire.dtype == torch.uint8 and wire.numel() == comp.nbytes(n)
        assert torch.equal(comp.decompress(comp.from_wire(wire, x.shape)), out)


def test_bits_per_element():
    n = 128 * 1000
    assert Quantize(32).bits_per_element(n) == 32 and Quantize(16).bits_per_element(n) == 16
    assert Quantize(8).bits_per_element(n) == 8 + 32 / 128
    assert Quantize(4).bits_per_element(n) == 4 + 32 / 128
    assert Quantize(2).bits_per_element(n) == 2 + 32 / 128
    assert Quantize(2, scale_dtype="bfloat16").bits_per_element(n) == 2 + 16 / 128
    assert TopK(0.01).nbytes(n) == 1280 * 8  # int32 index + fp32 value per kept entry
    assert RandomK(0.01).nbytes(n) == 1280 * 4 + 8  # values + the 8-byte seed


def test_exact_and_bf16_settings():
    x = heavy_tailed(1000)
    assert torch.equal(Quantize(32).roundtrip(x), x)
    assert torch.equal(Quantize(16).roundtrip(x), x.to(torch.bfloat16).float())
    # stochastic bf16: one of the two neighbours (magnitude truncated, or one bf16 step up), unbiased on average
    bits = x.view(torch.int32)
    down = (bits & -65536).view(torch.float32)
    up = ((bits & -65536) + 65536).view(torch.float32)
    outs = torch.stack([Quantize(16, rounding="stochastic").roundtrip(x, salt=s) for s in range(200)])
    assert torch.all((outs == down) | (outs == up))
    assert float(((outs.mean(0) - x).abs() / (up - down).abs()).mean()) < 0.05


@pytest.mark.parametrize("bits", [8, 4])
def test_8_and_4_bits_are_the_quant_library_arithmetic(bits):
    x = heavy_tailed(1000)
    comp = Quantize(bits, block_size=64)
    qmap = get_map(comp.map, bits, True)
    codes, scales = quantize_blockwise(x, qmap, 64)
    p = comp.compress(x)
    assert torch.equal(p.tensors["codes"], codes) and torch.equal(p.tensors["scales"], scales)
    assert torch.equal(comp.decompress(p), dequantize_blockwise(codes, scales, qmap, 64, 1000))


def test_2bit_packing_and_levels():
    codes = torch.randint(0, 4, (1001,))
    packed = pack_2bit(codes)
    assert packed.numel() == 251 and torch.equal(unpack_2bit(packed, 1001), codes)
    x = heavy_tailed(1000)
    for name, levels in [("linear_nozero", (-1, -1 / 3, 1 / 3, 1)), ("linear", (-1, 0, 1))]:
        comp = Quantize(2, block_size=100, map=name)
        assert torch.equal(map_2bit(name).levels, torch.tensor(levels, dtype=torch.float32))
        out = comp.roundtrip(x).view(10, 100)
        scale = x.view(10, 100).abs().amax(1, keepdim=True)
        lv = torch.tensor(levels, dtype=torch.float32)
        assert torch.all((out / scale).unsqueeze(-1).sub(lv).abs().min(-1).values < 1e-6)  # on a level
        gap = float((lv[1:] - lv[:-1]).max())
        assert torch.all((out - x.view(10, 100)).abs() <= scale * gap / 2 + 1e-6)  # nearest: half a gap


def test_2bit_stochastic_rounding_is_unbiased():
    x = heavy_tailed(256)
    comp = Quantize(2, rounding="stochastic")
    mean = torch.stack([comp.roundtrip(x, salt=s) for s in range(400)]).mean(0)
    scale = x.abs().max()
    assert float((mean - x).abs().max() / scale) < 0.12  # 400 draws of a +-1/3-of-scale rounding
    assert float((mean - x).abs().mean() / scale) < 0.03


def test_topk_is_the_exact_topk_through_the_sampled_threshold():
    x = heavy_tailed(200_000)
    comp = TopK(0.01)
    idx = comp.compress(x, salt=1).tensors["indices"].long()
    assert torch.equal(idx, torch.topk(x.abs(), 2000).indices.sort().values)
    assert comp.fallbacks == 0
    out = comp.roundtrip(x)
    assert torch.equal(out[idx], x[idx]) and int((out != 0).sum()) == 2000
    # with no oversampling the sampled threshold sometimes keeps fewer than k: the exact top-k is taken then
    tight = TopK(0.01, oversample=1.0, sample_fraction=0.001)
    for salt in range(12):
        assert torch.equal(tight.compress(x, salt=salt).tensors["indices"].long(), idx)
    assert tight.fallbacks > 0


def test_randomk_draws_k_entries_from_the_seed_and_is_unbiased():
    x = heavy_tailed(4000)
    comp = RandomK(0.25)
    p = comp.compress(x, salt=9)
    idx = RandomK.indices(4000, 1000, 9)
    assert idx.unique().numel() == 1000 and torch.equal(idx, RandomK.indices(4000, 1000, 9))
    out = comp.decompress(p)
    assert torch.equal(out[idx], x[idx] * 4) and int((out != 0).sum()) <= 1000
    assert not torch.equal(idx, RandomK.indices(4000, 1000, 10))
    mean = torch.stack([comp.roundtrip(x, salt=s) for s in range(300)]).mean(0)
    assert float((mean - x).norm() / x.norm()) < 0.15  # sqrt(3 / 300) = 0.1 expected
    assert torch.equal(RandomK(0.25, rescale=False).roundtrip(x, salt=9)[idx], x[idx])


def test_bad_input_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="bits"):
        Quantize(3)
    with pytest.raises(ValueError, match="map"):
        Quantize(16, map="linear")
    with pytest.raises(ValueError, match="2-bit map"):
        Quantize(2, map="dynamic")
    with pytest.raises(ValueError, match="block_size"):
        Quantize(4, block_size=33)
    with pytest.raises(ValueError, match="fraction"):
        TopK(0)
    with pytest.raises(ValueError, match="fraction"):
        RandomK(1.5)
    with pytest.raises(ValueError, match="values"):
        TopK(0.1, values="8bit")
    with pytest.raises(FloatingPointError, match="NaN"):
        Quantize(8).compress(torch.tensor([1.0, float("nan")]))
    with pytest.raises(TypeError, match="floating"):
        Quantize(8).compress(torch.arange(4))
    with pytest.raises(ValueError, match="uint8 bytes"):
        Quantize(8).from_wire(torch.zeros(3, dtype=torch.uint8), (100,))
    with pytest.raises(ValueError, match="key"):
        NoFeedback(Quantize(8)).compress("w", torch.ones(3))


def _grads(steps: int, n: int = 3000):
    return [heavy_tailed(n, seed=s) + 0.5 for s in range(steps)]  # a bias: 2-bit rounding errors add up


def test_error_feedback_sends_what_was_lost_later():
    grads = _grads(20)
    exact = ErrorFeedback(Quantize(2), residual=Quantize(32))
    sent = sum(exact.roundtrip(0, g) for g in grads)
    total = sum(grads)
    # exact residual: what was sent + what is still owed = what came in
    assert torch.allclose(sent + exact.residual(0), total, atol=1e-4)
    plain = sum(NoFeedback(Quantize(2)).roundtrip(0, g) for g in grads)
    eight = ErrorFeedback(Quantize(2))  # the residual itself in 8 bits
    sent8 = sum(eight.roundtrip(0, g) for g in grads)
    err = lambda s: float((s - total).norm() / total.norm())  # noqa: E731
    assert err(sent) < err(plain) / 4 and err(sent8) < err(plain) / 4
    assert eight.state_nbytes() == Quantize(8).nbytes(3000) and exact.state_nbytes() == 4 * 3000


def test_error_feedback_state_resumes_exactly_and_loads_weights_only():
    grads = _grads(6)
    ref = ErrorFeedback(Quantize(4, rounding="stochastic"), seed=3)
    outs = [ref.roundtrip((1, 2), g) for g in grads]
    first = ErrorFeedback(Quantize(4, rounding="stochastic"), seed=3)
    for g in grads[:3]:
        first.roundtrip((1, 2), g)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = ErrorFeedback(Quantize(4, rounding="stochastic"), seed=3)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    for g, want in zip(grads[3:], outs[3:]):
        assert torch.equal(resumed.roundtrip((1, 2), g), want)
    with pytest.raises(ValueError, match="seed"):
        ErrorFeedback(Quantize(4), seed=4).load_state_dict(first.state_dict())


def test_error_feedback_refuses_nonfinite_input_and_keeps_its_state():
    ef = ErrorFeedback(Quantize(4))
    ef.compress(0, torch.randn(100))
    before = ef.residual(0).clone()
    with pytest.raises(FloatingPointError):
        ef.compress(0, torch.full((100,), float("inf")))
    assert torch.equal(ef.residual(0), before) and ef.calls[0] == 1
    ef.compress(0, torch.randn(50))  # another size (a rebuilt bucket): starts from a zero residual
    assert ef.resets == 1 and ef.residual(0).numel() == 50


def test_dgc_momentum_correction_masking_and_warmup():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(400, generator=g) for _ in range(8)]
    dgc = DGC(fraction=0.02, momentum=0.9, warmup_calls=4)
    u = torch.zeros(400)
    v = torch.zeros(400)
    for call, grad in enumerate(grads):
        fraction = [0.25, 0.0625, 0.02, 0.02][call] if call < 4 else 0.02  # stages, never below fraction
        assert dgc.fraction_at(call) == fraction
        u = 0.9 * u + grad
        v = v + u
        k = {0.25: 100, 0.0625: 25, 0.02: 8}[fraction]
        idx = torch.topk(v.abs(), k).indices
        want = torch.zeros(400).index_copy_(0, idx, v[idx])
        p = dgc.compress(0, grad)
        assert dgc.compressor_for(0).k(400) == k and p.nbytes == k * 8
        assert torch.allclose(dgc.decompress(0, p), want)
        v[idx] = 0
        u[idx] = 0
    assert dgc.state_nbytes() == 2 * 4 * 400
    clipped = DGC(fraction=1.0, momentum=0.0, clip_norm=1.0).roundtrip(0, grads[0])
    assert torch.allclose(clipped.norm(), torch.tensor(1.0))


def test_dgc_state_resumes_exactly():
    grads = _grads(6, 500)
    ref = DGC(fraction=0.05, warmup_calls=4)
    outs = [ref.roundtrip(7, g) for g in grads]
    first = DGC(fraction=0.05, warmup_calls=4)
    for g in grads[:2]:
        first.roundtrip(7, g)
    resumed = DGC(fraction=0.05, warmup_calls=4)
    resumed.load_state_dict(first.state_dict())
    for g, want in zip(grads[2:], outs[2:]):
        assert torch.equal(resumed.roundtrip(7, g), want)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_quantize_through_the_compiled_kernel_equals_the_reference(bits, rounding):
    """8/4-bit compression of a CPU fp32 tensor takes the compiled quantizer: the same codes, scales and
    decoded values as the PyTorch reference, and the same refusal of non-finite input."""
    from efficient_optim.kernels.cpu import load_cpu_kernels
    from efficient_optim.quant import SCALE_DTYPES, dequantize_blockwise, quantize_blockwise

    if load_cpu_kernels() is None:
        pytest.skip("the CPU kernel could not be built here")
    c = Quantize(bits, rounding=rounding)
    x = torch.randn(5000, generator=torch.Generator().manual_seed(bits)) * torch.logspace(-5, 1, 5000)
    payload = c.compress(x, salt=5)
    codes, scales = quantize_blockwise(x, c.qmap, c.block_size, rounding, 5, SCALE_DTYPES[c.scale_dtype])
    assert torch.equal(payload.tensors["codes"], codes) and torch.equal(payload.tensors["scales"], scales)
    assert torch.equal(c.decompress(payload), dequantize_blockwise(codes, scales, c.qmap, c.block_size, 5000))
    x[123] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        c.compress(x)
