"""Benchmark model presets: shapes and parameter counts, a training step, the digits CNN."""

import pytest
import torch

from efficient_optim import QAdamW
from efficient_optim.bench.models import LM_PRESETS, DigitsCNN, build_lm, load_digits_tensors


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "preset,vocab,low,high",
    [
        ("gpt2-small", 50257, 124.0e6, 124.6e6),  # GPT-2 124M (tied embeddings)
        ("llama-60m", 32000, 57e6, 60e6),  # GaLore's LLaMA-60M shape (58M with a 32k vocabulary)
        ("gpt2-tiny", 256, 0.4e6, 0.5e6),
    ],
)
def test_presets_have_the_published_sizes(preset, vocab, low, high):
    with torch.device("meta"):
        model = build_lm(preset, vocab)
    assert low <= n_params(model) <= high, n_params(model)


def test_tiny_lm_trains_a_step_with_our_optimizer():
    model = build_lm("gpt2-tiny", 256)
    opt = QAdamW(model.parameters(), lr=1e-3, bits=4)
    x = torch.randint(0, 256, (2, 33))
    out = model(x[:, :-1], labels=x[:, :-1])
    out.loss.backward()
    opt.step()
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="unknown model preset"):
        build_lm("gpt5", 256)
    assert set(LM_PRESETS) >= {"gpt2-tiny", "gpt2-small", "llama-60m"}


def test_digits_cnn_learns_the_digits():
    pytest.importorskip("sklearn")
    torch.manual_seed(0)
    xt, yt, xv, yv = load_digits_tensors()
    assert xt.shape[1:] == (1, 8, 8) and len(xt) + len(xv) == 1797
    model = DigitsCNN()
    opt = QAdamW(model.parameters(), lr=3e-3, bits=8)
    for _ in range(3):
        for i in range(0, len(xt), 64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[i : i + 64]), yt[i : i + 64]).backward()
            opt.step()
    acc = (model(xv).argmax(1) == yv).float().mean().item()
    assert acc > 0.9, acc
