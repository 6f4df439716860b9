"""Parameter shapes of real models for the GPU step benchmark: GPT-2 small (124M), Llama 1B and 7B, ResNet-101.

Only shapes: the step benchmark fills them with random values. Each function returns a list of tuples, in
the model's parameter order.
"""

from __future__ import annotations


def gpt2_124m_shapes() -> list[tuple[int, ...]]:
    """GPT-2 small: token (50257 x 768) and position (1024 x 768) embeddings, 12 blocks (qkv, attention
    projection, MLP in/out with biases, two LayerNorms), the final LayerNorm: 124.4M parameters, 148 tensors
    (the output head is tied to the token embedding)."""
    d, shapes = 768, [(50257, 768), (1024, 768)]
    for _ in range(12):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes + [(d,), (d,)]


def llama_shapes(hidden: int, layers: int, intermediate: int, vocab: int, kv_dim: int, tied: bool) -> list[tuple[int, ...]]:
    """A Llama decoder: embedding, per layer q/k/v/o projections, gate/up/down MLP and two RMSNorm weights,
    the final norm and (untied) output head.

    Args:
        hidden: model width. layers: decoder layers. intermediate: MLP width. vocab: vocabulary size.
        kv_dim: width of the k and v projections (``hidden`` without grouped-query attention).
        tied: whether the output head shares the embedding (no separate head tensor).
    """
    shapes = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden, hidden), (kv_dim, hidden), (kv_dim, hidden), (hidden, hidden)]
        shapes += [(intermediate, hidden), (intermediate, hidden), (hidden, intermediate), (hidden,), (hidden,)]
    shapes.append((hidden,))
    return shapes if tied else shapes + [(vocab, hidden)]


def llama_1b_shapes() -> list[tuple[int, ...]]:
    """Llama 3.2 1B: width 2048, 16 layers, MLP 8192, vocabulary 128256, 8 kv heads of 64: 1.24B parameters."""
    return llama_shapes(2048, 16, 8192, 128256, 512, tied=True)


def llama_7b_shapes() -> list[tuple[int, ...]]:
    """Llama 2 7B: width 4096, 32 layers, MLP 11008, vocabulary 32000, no grouped-query attention: 6.74B."""
    return llama_shapes(4096, 32, 11008, 32000, 4096, tied=False)


def resnet101_shapes() -> list[tuple[int, ...]]:
    """ResNet-101 (torchvision layout): the 7x7 stem, bottleneck stages of 3, 4, 23 and 3 blocks (1x1, 3x3, 1x1
    convolutions, each with a BatchNorm weight and bias; a 1x1 downsample in each stage's first block) and
    the classifier: 44.5M parameters in 314 tensors, most of them small."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    channels = 64
    for width, blocks in ((64, 3), (128, 4), (256, 23), (512, 3)):
        for b in range(blocks):
            shapes += [(width, channels, 1, 1), (width,), (width,), (width, width, 3, 3), (width,), (width,)]
            shapes += [(4 * width, width, 1, 1), (4 * width,), (4 * width,)]
            if b == 0:
                shapes += [(4 * width, channels, 1, 1), (4 * width,), (4 * width,)]
            channels = 4 * width
    return shapes + [(1000, 2048), (1000,)]


SIZES = {"124m": gpt2_124m_shapes, "1b": llama_1b_shapes, "7b": llama_7b_shapes, "resnet101": resnet101_shapes}
