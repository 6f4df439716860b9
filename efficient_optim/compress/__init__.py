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

Specs (``parse_compressor``): ``"fp32" | "bf16" | "q8" | "q4" | "q2" | "top<P>%" | "top<P>%/q8" | "rand<P>%"``.
Controllers choose per-layer gradient specs and momentum specs every N steps (a ``LayerChoice`` per layer from
the shared ``menu``): ``StaticController``, ``AccordionController``, ``PlannerController`` and the learned
policy, all built by ``make_controller(kind, params, ...)``; ``TrainingBudget`` makes a memory limit hard.
"""

from .accumulate import GradAccumulator
from .base import Compressor, Payload
from .budget import TrainingBudget
from .controller import AccordionController, Controller, ControllerPolicy, LayerChoice, StaticController
from .ddp_hook import CompressionHookState, compressed_allreduce_hook, register_compression_hook
from .dgc import DGC
from .feedback import ErrorFeedback, GradientCompressor, NoFeedback, as_gradient_compressor
from .kinds import CONTROLLER_KINDS, make_controller
from .menu import (
    GRAD_BITS,
    GRAD_SPECS,
    KEEP_FRACTIONS,
    MOMENTUM_SPECS,
    choice_from_indices,
    grad_spec,
    indices_of,
)
from .planner import PlannerController
from .quantize import QUANTIZE_BITS, Quantize
from .sparsify import RandomK, TopK
from .specs import parse_compressor

__all__ = [
    "CONTROLLER_KINDS",
    "DGC",
    "GRAD_BITS",
    "GRAD_SPECS",
    "KEEP_FRACTIONS",
    "MOMENTUM_SPECS",
    "AccordionController",
    "QUANTIZE_BITS",
    "CompressionHookState",
    "Compressor",
    "Controller",
    "ControllerPolicy",
    "ErrorFeedback",
    "GradAccumulator",
    "GradientCompressor",
    "LayerChoice",
    "NoFeedback",
    "Payload",
    "PlannerController",
    "Quantize",
    "RandomK",
    "StaticController",
    "TopK",
    "TrainingBudget",
    "as_gradient_compressor",
    "choice_from_indices",
    "compressed_allreduce_hook",
    "grad_spec",
    "indices_of",
    "make_controller",
    "parse_compressor",
    "register_compression_hook",
]
