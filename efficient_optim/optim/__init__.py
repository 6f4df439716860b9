"""Update rules and the public optimizer classes built from rule x codecs."""

from .adamw_rule import adamw_update_
from .base import CodecOptimizer
from .qadamw import QAdamW

__all__ = ["CodecOptimizer", "QAdamW", "adamw_update_"]
