"""Update rules and the public optimizer classes built from rule x codecs."""

from .adafactor import Adafactor
from .adamw import AdamW
from .adamw_rule import adamw_update_
from .base import CodecOptimizer
from .galore_adamw import GaLoreAdamW
from .hybrid_adam import HybridAdam
from .lion import Lion, lion_update_
from .lowrank_adam import LowRankAdam
from .qadamw import QAdamW
from .sgd import SGD, sgd_momentum_update_

__all__ = ["Adafactor", "AdamW", "CodecOptimizer", "GaLoreAdamW", "HybridAdam", "Lion", "LowRankAdam", "QAdamW", "SGD", "adamw_update_",
           "lion_update_", "sgd_momentum_update_"]  # fmt: skip
