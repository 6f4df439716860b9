"""Characterization probes: state statistics, quantization / low-rank error over time, sharpness.

- ``StateProbe``: attach to any optimizer (public step hooks; nothing runs when detached) to record per
  layer and per state: moments, kurtosis, outliers and their persistence, histograms, the error against an
  exact fp32 shadow state (relative L2, max, per block), low-rank structure, update ratios, clipping
  events, sharpness. Records go to a JSON-lines file (``read_probes``) and ``analysis.plots`` draws them.
- ``hessian_top_eigenvalue``: sharpness by power iteration on Hessian-vector products.
- ``analysis.stats``: the statistics themselves, and the growth-exponent fit of an error series.
- ``decompose_errors`` (``analysis.decomposition``, protocol P3): the update-direction error of a HybridAdam
  configuration split into quantization alone, factoring / low rank alone and both, and how they combine.
"""

from .decomposition import decompose_errors
from .probe import ADAM_SHADOW, StateProbe, decoded_states, error_growth, error_series, read_probes
from .sharpness import hessian_top_eigenvalue
from .stats import effective_rank, error_stats, growth_exponent, lowrank_errors, tensor_stats

__all__ = [
    "ADAM_SHADOW",
    "StateProbe",
    "decoded_states",
    "decompose_errors",
    "effective_rank",
    "error_growth",
    "error_series",
    "error_stats",
    "growth_exponent",
    "hessian_top_eigenvalue",
    "lowrank_errors",
    "read_probes",
    "tensor_stats",
]
