"""The Quantized codec's compiled encode/decode give the same bits as the PyTorch reference (quant.blockwise)."""

import pytest
import torch

from efficient_optim.kernels.cpu import load_cpu_kernels
from efficient_optim.quant import dequantize_blockwise, quantize_blockwise
from efficient_optim.state import Quantized

pytestmark = pytest.mark.skipif(load_cpu_kernels() is None, reason="the CPU kernel could not be built here")


@pytest.mark.parametrize("bits,map_name,signed", [(8, "dynamic", True), (4, "dynamic", True), (4, "sqrt_nozero", False),
                                                  (8, "dynamic", False), (4, "linear", True), (8, "sqrt", True),
                                                  (8, "sqrt_nozero", False), (4, "sqrt", True)])  # fmt: skip
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("scale_dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("numel", [1, 255, 4096 + 77])
def test_kernel_encode_decode_equal_the_reference(bits, map_name, signed, rounding, scale_dtype, numel):
    codec = Quantized(bits, None, map_name, signed, rounding, scale_dtype)
    gen = torch.Generator().manual_seed(numel)
    x = torch.randn(numel, generator=gen) * torch.logspace(-6, 1, numel)
    if not signed:
        x = x.abs()
    x[numel // 3 :: 97] = 0.0  # exact zeros and an all-zero block's worth of values survive
    p = torch.empty(numel)
    state = {}
    codec.init(state, "m", p)
    codec.encode(state, "m", x, salt=12345)
    codes, scales = quantize_blockwise(x, codec.qmap, codec.block_size, rounding, 12345, codec.torch_scale_dtype)
    assert torch.equal(state["m.codes"], codes) and torch.equal(state["m.scales"], scales)
    ref = dequantize_blockwise(codes, scales, codec.qmap, codec.block_size, numel)
    assert torch.equal(codec.decode(state, "m", p), ref)


def test_kernel_encode_refuses_nonfinite_values_like_the_reference():
    codec, p, state = Quantized(8), torch.empty(300), {}
    codec.init(state, "m", p)
    x = torch.zeros(300)
    x[7] = float("nan")
    with pytest.raises(FloatingPointError):
        codec.encode(state, "m", x)
    assert torch.equal(state["m.codes"], torch.zeros_like(state["m.codes"]))


def test_noncontiguous_values_take_the_reference_path_with_the_same_result():
    codec, p, state, ref_state = Quantized(4, rounding="stochastic"), torch.empty(64, 32), {}, {}
    codec.init(state, "m", p)
    codec.init(ref_state, "m", p)
    x = torch.randn(32, 64).t()  # not contiguous
    codec.encode(state, "m", x, salt=3)
    codec.encode(ref_state, "m", x.contiguous(), salt=3)
    assert torch.equal(state["m.codes"], ref_state["m.codes"])


@pytest.mark.parametrize("bits,map_name,signed,form", [(8, "sqrt", True, 2), (4, "sqrt", True, 2), (8, "sqrt_nozero", False, 1),
                                                       (4, "sqrt_nozero", False, 1), (8, "dynamic", True, 0),
                                                       (8, "dynamic_nozero", False, 0), (8, "softsign", True, 0)])  # fmt: skip
def test_kernel_recognises_the_closed_form_maps(bits, map_name, signed, form):
    """The kernel computes the levels of ``sqrt`` / ``sqrt_nozero`` instead of reading tables (0 = tables)."""
    from efficient_optim.quant import get_map

    q = get_map(map_name, bits, signed)
    assert load_cpu_kernels().map_form(q.levels, signed) == form
    if form:  # one level off by one ulp: no longer the formula, back to the tables
        levels = q.levels.clone()
        levels[len(levels) // 2 + 1] = torch.nextafter(levels[len(levels) // 2 + 1], torch.tensor(2.0))
        assert load_cpu_kernels().map_form(levels, signed) == 0


@pytest.mark.parametrize("bits,map_name,signed", [(8, "sqrt", True), (4, "sqrt", True), (8, "sqrt_nozero", False),
                                                  (4, "sqrt_nozero", False), (8, "dynamic", True)])  # fmt: skip
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_kernel_codes_on_every_level_and_midpoint_equal_the_reference(bits, map_name, signed, rounding):
    """Values exactly on each level and each midpoint (ties) and one ulp either side, in blocks whose maximum
    is 1 (so the normalized value is the value itself): the closed-form encoders' exact corrections."""
    codec = Quantized(bits, 64, map_name, signed, rounding, "float32")
    q = codec.qmap
    points = torch.cat([q.levels, q.midpoints[:-1]])
    up, down = torch.nextafter(points, torch.tensor(2.0)), torch.nextafter(points, torch.tensor(-2.0))
    vals = torch.cat([points, up, down]).clamp(-1.0, 1.0)
    vals = vals[torch.randperm(len(vals), generator=torch.Generator().manual_seed(0))]
    blocks = vals.split(63)  # each block of 64: 63 test values and a 1.0 that fixes the scale at 1
    x = torch.cat([torch.cat([b, torch.ones(1)]) for b in blocks])
    p, state = torch.empty(x.numel()), {}
    codec.init(state, "m", p)
    codec.encode(state, "m", x, salt=7)
    codes, scales = quantize_blockwise(x, q, 64, rounding, 7, torch.float32)
    assert torch.equal(state["m.scales"], scales)
    assert torch.equal(state["m.codes"], codes)
    assert torch.equal(codec.decode(state, "m", p), dequantize_blockwise(codes, scales, q, 64, x.numel()))
