"""Quantization maps and block-wise quantization: error bounds, edge values, packing, rounding."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from efficient_optim.quant import (
    MAP_NAMES,
    dequantize_blockwise,
    get_map,
    learned_map,
    pack_codes,
    quantize_blockwise,
    round_scale_up,
    unpack_codes,
)
from efficient_optim.quant.maps import (
    floor_index,
    floor_index_by_table,
    nearest_index,
    nearest_index_by_table,
)

BUILTIN = [m for m in MAP_NAMES if m != "learned"]
CONFIGS = [(name, bits, signed) for name in BUILTIN for bits in (8, 4) for signed in (True, False)]


def max_abs_error(qmap, rounding: str) -> float:
    """Largest |u - level| the map allows for a normalized u in its range (before scaling)."""
    lv = qmap.levels.double()
    lo_edge = -1.0 if qmap.signed else 0.0
    gaps = lv[1:] - lv[:-1]
    edges = max(float(lv[0]) - lo_edge, 1.0 - float(lv[-1]))
    inner = float(gaps.max()) if rounding == "stochastic" else float(gaps.max()) / 2
    return max(inner, edges)


@pytest.mark.parametrize("name,bits,signed", CONFIGS)
def test_maps_are_sorted_and_fit_their_bits(name, bits, signed):
    m = get_map(name, bits, signed)
    assert m.num_levels <= 2**bits
    assert torch.all(m.levels[1:] > m.levels[:-1])
    assert float(m.levels[-1]) == 1.0
    assert float(m.levels[0]) == (-1.0 if signed else float(m.levels[0]))
    if not signed:
        assert float(m.levels[0]) >= 0
    if name == "linear_nozero":
        assert not m.has_zero
    elif name in ("dynamic", "linear", "softsign"):
        assert m.has_zero


def test_dynamic_8bit_uses_all_codes_and_spans_decades():
    for signed in (True, False):
        m = get_map("dynamic", 8, signed)
        assert m.num_levels == 256
        positive = m.levels[m.levels > 0]
        assert float(positive.min()) < 1e-6  # seven decades below 1


@pytest.mark.parametrize("name,bits,signed", CONFIGS)
def test_bucket_table_reproduces_searchsorted_exactly(name, bits, signed):
    m = get_map(name, bits, signed)
    g = torch.Generator().manual_seed(1)
    u = torch.randn(50000, generator=g) * torch.exp(torch.randn(50000, generator=g) * 5)
    specials = torch.cat([m.levels, torch.nextafter(m.levels, m.levels + 1), torch.nextafter(m.levels, m.levels - 1)])
    u = torch.cat([u, specials, torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-30])])
    u = u.clamp(float(m.levels[0]), float(m.levels[-1]))
    if not signed:
        u = u.clamp(min=0)
    assert torch.equal(floor_index(m.levels, u), floor_index_by_table(m, u))
    mids = m.midpoints[:-1]
    u2 = torch.cat([u, mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1)])
    u2 = u2.clamp(float(m.levels[0]), float(m.levels[-1]))
    assert torch.equal(nearest_index(m, u2), nearest_index_by_table(m, u2))
    # and it is the nearest level (ties aside, checked in float64)
    err = (m.levels[nearest_index(m, u)].double() - u.double()).abs()
    best = (m.levels.double()[None, :] - u.double()[:, None]).abs().min(1).values
    assert torch.all(err <= best * (1 + 1e-6) + 1e-12)


@settings(max_examples=40, deadline=None)
@given(
    cfg=st.sampled_from(CONFIGS),
    n=st.integers(1, 700),
    block=st.sampled_from([2, 16, 64, 128, 256, 250]),
    log_scale=st.floats(-30, 30),
    rounding=st.sampled_from(["nearest", "stochastic"]),
    scale_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_roundtrip_error_is_within_the_map_bound(cfg, n, block, log_scale, rounding, scale_dtype, seed):
    name, bits, signed = cfg
    if bits == 4 and block % 2:
        block += 1
    qmap = get_map(name, bits, signed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * math.exp(log_scale)
    if not signed:
        x = x.abs()
    codes, scales = quantize_blockwise(x, qmap, block, rounding, salt=seed, scale_dtype=scale_dtype)
    y = dequantize_blockwise(codes, scales, qmap, block, n)
    assert torch.isfinite(y).all()
    per_elem_scale = scales.float().repeat_interleave(block)[:n]
    bound = max_abs_error(qmap, rounding) * per_elem_scale
    # fp32 rounding of u = x * (1/s) and of level * s adds a few ulps
    assert torch.all((y - x).abs() <= bound * (1 + 1e-5) + per_elem_scale * 1e-6)
    # scales never underestimate the block maximum (so normalized values stay within [-1, 1])
    absmax = torch.nn.functional.pad(x.abs(), (0, scales.numel() * block - n)).view(-1, block).amax(1)
    assert torch.all(scales.float() >= absmax)


def test_all_zero_blocks_round_trip_exactly_even_for_zero_free_maps():
    x = torch.zeros(1000)
    x[300:310] = 1.5  # one non-zero block among zero blocks
    for name in BUILTIN:
        for bits in (8, 4):
            qmap = get_map(name, bits, False)
            c, s = quantize_blockwise(x, qmap, 128)
            y = dequantize_blockwise(c, s, qmap, 128, 1000)
            assert torch.equal(y[:256], x[:256]) and torch.equal(y[384:], x[384:])


def test_exact_zeros_survive_in_maps_with_a_zero_level():
    x = torch.randn(512)
    x[::3] = 0
    for name in ("dynamic", "linear", "softsign"):
        qmap = get_map(name, 8, True)
        y = dequantize_blockwise(*quantize_blockwise(x, qmap, 256), qmap, 256, 512)
        assert torch.all(y[::3] == 0)


def test_denormals_and_huge_values_create_no_nan_or_inf():
    x = torch.tensor([1e-45, -1e-40, 3e-39, 0.0] * 64 + [3.0e38, -3.3e38, 1.0, -2.0] * 64)
    for sd in (torch.float32, torch.bfloat16):
        for name in BUILTIN:
            qmap = get_map(name, 8, True)
            c, s = quantize_blockwise(x, qmap, 256, scale_dtype=sd)
            y = dequantize_blockwise(c, s, qmap, 256, x.numel())
            assert torch.isfinite(s.float()).all() and torch.isfinite(y).all()


def test_bf16_scale_rounds_up_and_never_overflows():
    a = torch.tensor([1.0, 1.0001, 3.3e38, 3.4028e38, 1e-40, 0.0])
    s = round_scale_up(a, torch.bfloat16).float()
    assert torch.isfinite(s).all()
    assert torch.all(s[:3] >= a[:3])
    assert s[-1] == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_input_is_rejected_not_encoded(bad):
    x = torch.randn(300)
    x[17] = bad
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        quantize_blockwise(x, get_map("dynamic", 8, True), 256)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 301))
def test_4bit_packing_round_trips(n):
    codes = torch.randint(0, 16, (n,))
    packed = pack_codes(codes, 4)
    assert packed.numel() == (n + 1) // 2 and packed.dtype == torch.uint8
    assert torch.equal(unpack_codes(packed, 4, n), codes)


def test_stochastic_rounding_is_reproducible_unbiased_and_seed_dependent():
    qmap = get_map("linear", 4, True)
    x = torch.linspace(-1, 1, 997)
    a = quantize_blockwise(x, qmap, 128, "stochastic", salt=7)
    b = quantize_blockwise(x, qmap, 128, "stochastic", salt=7)
    c = quantize_blockwise(x, qmap, 128, "stochastic", salt=8)
    assert torch.equal(a[0], b[0])
    assert not torch.equal(a[0], c[0])
    mean = torch.stack(
        [dequantize_blockwise(*quantize_blockwise(x, qmap, 128, "stochastic", salt=k), qmap, 128, 997) for k in range(400)]
    ).mean(0)
    step = 1 / 7  # level spacing of the 4-bit signed linear map
    # mean of 400 draws: standard error <= step / (2 * 20); allow 4.5 sigma
    assert (mean - x).abs().max() < 4.5 * step / 40
    nearest_err = (dequantize_blockwise(*quantize_blockwise(x, qmap, 128), qmap, 128, 997) - x).abs().mean()
    assert (mean - x).abs().mean() < nearest_err / 3


def test_invalid_arguments_name_the_problem():
    qmap = get_map("dynamic", 4, True)
    with pytest.raises(ValueError, match="block_size"):
        quantize_blockwise(torch.randn(10), qmap, 7)
    with pytest.raises(ValueError, match="rounding"):
        quantize_blockwise(torch.randn(10), qmap, 8, rounding="up")
    with pytest.raises(ValueError, match="unknown quantization map"):
        get_map("uniform", 8, True)
    with pytest.raises(ValueError, match="bits"):
        get_map("dynamic", 3, True)


def test_learned_map_plugs_into_the_same_encoder():
    g = torch.Generator().manual_seed(0)
    levels = torch.sort(torch.cat([torch.rand(14, generator=g) * 2 - 1, torch.tensor([-1.0, 1.0])])).values
    qmap = learned_map(levels, 4, True)
    x = torch.randn(1000, generator=g)
    y = dequantize_blockwise(*quantize_blockwise(x, qmap, 128), qmap, 128, 1000)
    assert ((y - x).abs() <= max_abs_error(qmap, "nearest") * x.abs().max() + 1e-6).all()
    with pytest.raises(ValueError, match="magnitude 1"):
        learned_map([0.1, 0.5], 4, True)
