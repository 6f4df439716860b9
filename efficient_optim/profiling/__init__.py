"""Exact state bytes, peak memory and step timers."""

from .state_bytes import bytes_per_param, state_breakdown, state_bytes
from .training_bytes import training_bytes

__all__ = ["bytes_per_param", "state_breakdown", "state_bytes", "training_bytes"]
