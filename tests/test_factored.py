"""The Factored codec against Adafactor's reference formulas."""

import pytest
import torch

from efficient_optim.state import Factored


def test_a_rank_one_nonnegative_matrix_round_trips_exactly():
    codec, p = Factored(), torch.zeros(6, 5)
    a, b = torch.rand(6) + 0.1, torch.rand(5) + 0.1
    v = torch.outer(a, b)
    state = {}
    codec.init(state, "v", p)
    codec.encode(state, "v", v)
    assert torch.allclose(codec.decode(state, "v", p), v, rtol=1e-5)
    assert set(state) == {"v.row", "v.col"} and codec.nbytes(state, "v") == (6 + 5) * 4


def test_reconstruction_keeps_row_and_column_means():
    codec, p, state = Factored(), torch.zeros(3, 7, 9), {}
    codec.init(state, "v", p)
    v = torch.rand(3, 7, 9)
    codec.encode(state, "v", v)
    back = codec.decode(state, "v", p)
    assert torch.allclose(back.mean(-1), v.mean(-1), rtol=1e-5) and torch.allclose(back.mean(-2), v.mean(-2), rtol=1e-5)
    assert codec.expected("v", p) == {"v.row": ((3, 7), torch.float32), "v.col": ((3, 9), torch.float32)}


def test_an_ema_through_the_codec_is_adafactors_ema_of_row_and_column_statistics():
    codec, p, state = Factored(), torch.zeros(8, 4), {}
    codec.init(state, "v", p)
    row, col = torch.zeros(8), torch.zeros(4)
    gen = torch.Generator().manual_seed(0)
    for step in range(1, 8):
        g2 = torch.randn(8, 4, generator=gen).square() + 1e-30
        beta = 1 - step**-0.8
        v = codec.decode(state, "v", p).mul_(beta).add_(g2, alpha=1 - beta)
        codec.encode(state, "v", v)
        row = beta * row + (1 - beta) * g2.mean(-1)  # Shazeer & Stern (with means)
        col = beta * col + (1 - beta) * g2.mean(-2)
    assert torch.allclose(state["v.row"], row, rtol=1e-5) and torch.allclose(state["v.col"], col, rtol=1e-5)
    expected = torch.outer(row, col) / row.mean()
    assert torch.allclose(codec.decode(state, "v", p), expected, rtol=1e-5)


@pytest.mark.parametrize("shape", [(7,), ()])
def test_vectors_stay_dense(shape):
    codec, p, state = Factored(), torch.zeros(shape), {}
    codec.init(state, "v", p)
    codec.encode(state, "v", torch.full(shape, 2.0))
    assert torch.equal(codec.decode(state, "v", p), torch.full(shape, 2.0))


def test_all_zero_moment_decodes_to_zero_without_nan():
    codec, p, state = Factored(), torch.zeros(4, 4), {}
    codec.init(state, "v", p)
    assert torch.equal(codec.decode(state, "v", p), torch.zeros(4, 4))
    assert torch.equal(Factored.project_(torch.zeros(4, 4)), torch.zeros(4, 4))


def test_encode_of_any_dense_value_is_a_projection_onto_row_and_column_means():
    codec, p, state = Factored(), torch.zeros(5, 6), {}
    codec.init(state, "v", p)
    v = torch.rand(5, 6, generator=torch.Generator().manual_seed(1))
    codec.encode(state, "v", v)
    assert torch.allclose(state["v.row"], v.mean(-1)) and torch.allclose(state["v.col"], v.mean(-2))
    once = codec.decode(state, "v", p)
    assert torch.allclose(Factored.project_(v.clone()), once, rtol=1e-6)  # project_ = decode(encode(.))
    codec.encode(state, "v", once)  # projecting twice changes nothing
    assert torch.allclose(codec.decode(state, "v", p), once, rtol=1e-5)


def test_eps_floors_the_reconstruction_and_is_validated():
    codec, p, state = Factored(eps=1e-3), torch.zeros(2, 3), {}
    codec.init(state, "v", p)
    state["v.row"].fill_(1e-6)
    state["v.col"].fill_(1e-6)
    assert torch.allclose(codec.decode(state, "v", p), torch.full((2, 3), 1e-6 * 1e-6 / 1e-3))
    for bad in (0.0, -1.0, float("nan"), "1e-30"):
        with pytest.raises(ValueError, match="eps"):
            Factored(eps=bad)


def test_state_is_plain_tensors_that_load_weights_only():
    import io

    codec, p, state = Factored(), torch.zeros(4, 8), {}
    codec.init(state, "v", p)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=True)
    assert {k: (tuple(t.shape), t.dtype) for k, t in back.items()} == codec.expected("v", p)
