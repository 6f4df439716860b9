"""The Quantized codec's compiled encode/decode give the same bits as the PyTorch reference (quant.blockwise)."""

import pytest
import torch

from efficient_optim.kernels.cpu import load_cpu_kernels
from efficient_optim.quant import dequantize_blockwise, quantize_blockwise
from efficient_optim.state import Quantized

pytestmark = pytest.mark.skipif(load_cpu_kernels() is None, reason="the CPU kernel could not be built here")


@pytest.mark.parametrize("bits,map_name,signed", [(8, "dynamic", True), (4, "dynamic", True), (4, "sqrt_nozero", False),
                                                  (8, "dynamic", False), (4, "linear", True)])  # fmt: skip
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
