"""efficient_optim: memory-efficient PyTorch optimizers and the tools that measure what they save and cost.

An optimizer here is an update rule x a storage codec for each of its states, chosen per parameter by a
policy (see DESIGN.md). Public entry points:

- ``AdamW``: AdamW whose two moments use any codec (``m=``, ``v=``: ``"fp32"``, ``"bf16"``, ``"8bit"``,
  ``"4bit"``, ``"factored"``, ``"lowrank"`` or a codec instance), chosen per parameter by ``policy=``.
- ``QAdamW``: AdamW with block-wise quantized (8/4-bit) or dense (32/16-bit) moments.
- ``HybridAdam``: AdamW with a 4-bit first moment and a factored second moment (~0.52 B/param).
- ``LowRankAdam``: AdamW with a rank-r first moment of each weight matrix and a factored second moment.
- ``GaLoreAdamW``: GaLore's rule (Adam inside a periodically refreshed low-rank gradient subspace).
- ``Adafactor``, ``Lion``, ``SGD``: the baselines' rules, their states through the same codecs.
- ``policy``: ``ByName`` (per-parameter specs by name), ``Schedule`` (specs that change over training).
- ``create_optimizer(name, params_or_model, **kw)`` / ``list_optimizers()``: the registry.
- ``state_bytes(optimizer)``, ``state_breakdown(...)``, ``bytes_per_param(...)``: exact state memory.
- ``training_bytes(model, optimizer)``: weights + gradients + states + weight corrections.
- ``enable_gradient_release(model, optimizer)``: step each parameter during backward and free its gradient.
"""

from . import policy
from .optim import SGD, Adafactor, AdamW, GaLoreAdamW, HybridAdam, Lion, LowRankAdam, QAdamW
from .optim.gradient_release import enable_gradient_release
from .profiling import bytes_per_param, state_breakdown, state_bytes, training_bytes
from .registry import create_optimizer, list_optimizers, register_optimizer

__version__ = "0.1.0"

__all__ = [
    "SGD",
    "Adafactor",
    "AdamW",
    "GaLoreAdamW",
    "HybridAdam",
    "Lion",
    "LowRankAdam",
    "QAdamW",
    "bytes_per_param",
    "create_optimizer",
    "enable_gradient_release",
    "list_optimizers",
    "policy",
    "register_optimizer",
    "state_breakdown",
    "state_bytes",
    "training_bytes",
]
