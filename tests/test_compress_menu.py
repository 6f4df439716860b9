"""The controllers' shared action space (compress/menu.py)."""

import pytest

from efficient_optim.compress import (
    GRAD_BITS,
    GRAD_SPECS,
    KEEP_FRACTIONS,
    MOMENTUM_SPECS,
    LayerChoice,
    choice_from_indices,
    grad_spec,
    indices_of,
    parse_compressor,
)


def test_grad_specs_name_the_compressors_they_build():
    assert (grad_spec(8, 1.0), grad_spec(16, 1.0), grad_spec(32, 1.0), grad_spec(2, 1.0)) == ("q8", "bf16", "fp32", "q2")
    assert grad_spec(4, 0.1) == "top10%/q4" and grad_spec(32, 0.01) == "top1%" and grad_spec(16, 0.1) == "top10%/bf16"
    assert len(set(GRAD_SPECS)) == len(GRAD_BITS) * len(KEEP_FRACTIONS)
    for spec in GRAD_SPECS:
        assert parse_compressor(spec).describe() == spec  # every menu spec is a valid compressor spec
    for bad in [(3, 1.0), (8, 0.5), ("8", 1.0)]:
        with pytest.raises(ValueError):
            grad_spec(*bad)


def test_each_dimension_is_ordered_cheapest_first():
    n = 1 << 16
    for keep in KEEP_FRACTIONS:
        sizes = [parse_compressor(grad_spec(b, keep)).nbytes(n) for b in GRAD_BITS]
        assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    for bits in GRAD_BITS:
        sizes = [parse_compressor(grad_spec(bits, k)).nbytes(n) for k in KEEP_FRACTIONS]
        assert sizes[0] < min(sizes[1:])  # 1 % is always the cheapest
        # 10 % holds an int32 index per kept value: cheaper than dense from 4 bits on, dearer at 2 bits
        assert (sizes[1] < sizes[2]) == (bits >= 4)
    assert MOMENTUM_SPECS == ("4bit", "8bit", "bf16", "fp32")


def test_indices_round_trip_and_bad_indices_are_named():
    for b in range(len(GRAD_BITS)):
        for k in range(len(KEEP_FRACTIONS)):
            for m in range(len(MOMENTUM_SPECS)):
                choice = choice_from_indices(b, k, m)
                assert isinstance(choice, LayerChoice) and indices_of(choice) == (b, k, m)
    assert choice_from_indices(2, 2, 1) == LayerChoice("q8", "8bit")
    with pytest.raises(ValueError, match="bits_i"):
        choice_from_indices(5, 0, 0)
    with pytest.raises(ValueError, match="momentum_i"):
        choice_from_indices(0, 0, True)
    with pytest.raises(ValueError, match="not on the menu"):
        indices_of(LayerChoice("rand10%", "8bit"))
    with pytest.raises(ValueError, match="not on the menu"):
        indices_of(LayerChoice("q8", "factored"))
