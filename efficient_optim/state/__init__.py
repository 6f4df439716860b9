"""Codecs for optimizer states: how each state tensor is stored between steps."""

from .codec import StateCodec
from .dense import Dense
from .factored import Factored
from .quantized import DEFAULT_BLOCK_SIZE, Quantized

__all__ = ["DEFAULT_BLOCK_SIZE", "Dense", "Factored", "Quantized", "StateCodec"]
