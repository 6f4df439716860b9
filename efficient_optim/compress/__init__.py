"""Gradient compression: small composable compressors with exact byte accounting, error feedback with a
compressed residual, and the places compression saves memory or bytes on the wire (docs/mango.md).

Compressors (stateless; ``compress(t, salt=) -> Payload``, ``decompress(payload) -> t``, ``nbytes(numel)``):

- ``Quantize(bits)``: 32 (fp32), 16 (bf16), 8, 4 or 2 bits, block-wise absmax (``efficient_optim.quant``).
- ``TopK(fraction)``: the largest-magnitude entries, DGC's sampled threshold; ``values=`` compresses them.
- ``RandomK(fraction)``: random entries (the random-dropping baseline); indices regenerated from a seed.

Stateful, one ``compress(key, t)`` per tensor:

- ``NoFeedback(c)``, ``ErrorFeedback(c, residual=Quantize(8))``, ``DGC(fraction, momentum, ...)``.

Where they apply: ``GradAccumulator`` (micro-batch gradients summed compressed), gradient release
(``enable_gradient_release(model, opt, compressor=...)``) and DDP (``register_compression_hook``).
"""

from .accumulate import GradAccumulator
from .base import Compressor, Payload
from .ddp_hook import CompressionHookState, compressed_allreduce_hook, register_compression_hook
from .dgc import DGC
from .feedback import ErrorFeedback, GradientCompressor, NoFeedback, as_gradient_compressor
from .quantize import QUANTIZE_BITS, Quantize
from .sparsify import RandomK, TopK

__all__ = [
    "DGC",
    "QUANTIZE_BITS",
    "CompressionHookState",
    "Compressor",
    "ErrorFeedback",
    "GradAccumulator",
    "GradientCompressor",
    "NoFeedback",
    "Payload",
    "Quantize",
    "RandomK",
    "TopK",
    "as_gradient_compressor",
    "compressed_allreduce_hook",
    "register_compression_hook",
]
