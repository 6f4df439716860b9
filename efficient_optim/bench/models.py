"""Benchmark models, built from ``transformers`` configs (no weights are downloaded).

Language-model presets (``build_lm(preset, vocab_size)``):
- ``gpt2-tiny``: 2 layers, width 128, 4 heads, context 128 — trains in minutes on 2 CPU cores.
- ``gpt2-mini``: 4 layers, width 256, 4 heads, context 256 — a longer CPU run.
- ``gpt2-small``: GPT-2 124M (12 layers, width 768, 12 heads, context 1024) — for a GPU.
- ``llama-60m``: GaLore's LLaMA-60M shape (hidden 512, 8 layers, 8 heads, intermediate 1376, context 256).

A second architecture for protocols that need one: ``DigitsCNN`` on scikit-learn's ``load_digits`` (8x8
grey images of handwritten digits, 1,797 samples, shipped with scikit-learn: no download).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LMPreset:
    """Shape of a language-model preset.

    Args:
        family: ``gpt2`` or ``llama``.
        layers, width, heads: transformer depth, hidden size and attention heads.
        context: maximum sequence length.
        intermediate: MLP width (llama only; GPT-2 uses 4 x width).
    """

    family: str
    layers: int
    width: int
    heads: int
    context: int
    intermediate: int | None = None


LM_PRESETS = {
    "gpt2-tiny": LMPreset("gpt2", 2, 128, 4, 128),
    "gpt2-mini": LMPreset("gpt2", 4, 256, 4, 256),
    "gpt2-small": LMPreset("gpt2", 12, 768, 12, 1024),
    "llama-60m": LMPreset("llama", 8, 512, 8, 256, intermediate=1376),
}


def lm_preset(preset: str, **overrides) -> LMPreset:
    """The named preset with any of ``layers``, ``width``, ``heads``, ``context`` replaced (``None`` keeps)."""
    if preset not in LM_PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(LM_PRESETS)} or digits-cnn")
    changes = {k: v for k, v in overrides.items() if v is not None}
    s = dataclasses.replace(LM_PRESETS[preset], **changes)
    if s.width % s.heads:
        raise ValueError(f"width {s.width} is not divisible by heads {s.heads}")
    return s


def build_lm(preset: str, vocab_size: int, seed: int = 0, **overrides) -> torch.nn.Module:
    """A freshly initialized causal LM of the named preset with ``vocab_size`` tokens (seeded init).

    ``overrides``: ``layers``, ``width``, ``heads``, ``context`` to change the preset's shape.
    """
    s = lm_preset(preset, **overrides)
    torch.manual_seed(seed)
    if s.family == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(vocab_size=vocab_size, n_positions=s.context, n_embd=s.width, n_layer=s.layers,
                         n_head=s.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                         bos_token_id=0, eos_token_id=0)  # fmt: skip
        return GPT2LMHeadModel(cfg)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=s.width, intermediate_size=s.intermediate,
                      num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.heads,
                      max_position_embeddings=s.context, bos_token_id=0, eos_token_id=0,
                      tie_word_embeddings=False)  # fmt: skip
    return LlamaForCausalLM(cfg)


class DigitsCNN(torch.nn.Module):
    """A small CNN for 8x8 digit images: two 3x3 conv layers (32, 64 channels), a 128-unit hidden layer."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        )  # fmt: skip
        self.head = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(64 * 4 * 4, 128), torch.nn.ReLU(), torch.nn.Linear(128, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_digits_tensors(val_fraction: float = 0.2, seed: int = 0):
    """scikit-learn's digits as ``(x_train, y_train, x_val, y_val)``: images scaled to [0, 1], shape
    (N, 1, 8, 8), a seeded split. Needs scikit-learn (``pip install 'efficient_optim[bench]'``)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise RuntimeError("the digits CNN needs scikit-learn: pip install 'efficient_optim[bench]'") from None
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = int(len(y) * val_fraction)
    val, train = perm[:n_val], perm[n_val:]
    return x[train], y[train], x[val], y[val]
