"""Policies: which codec each state of each parameter gets (``update rule x state codec x policy``).

- ``Policy``: the static policy (the optimizer's settings decide); the base of every policy.
- ``ByName``: per-parameter specs by regular expression on ``named_parameters()`` names.
- ``ByIndex``: per-parameter specs by position (plain ``parameters()``).
- ``Budget``: adaptive precision under a hard memory budget (fixed, data-driven and dynamic allocators).
- ``Schedule``: a policy per range of steps (states are transcoded once at each boundary).
- ``specs``: the vocabulary (``"fp32" | "bf16" | "8bit" | "4bit" | "factored" | "lowrank"`` or a codec) and
  ``resolve_codec``, the one place specs become codecs (with the one small-tensor rule).
"""

from .budget import Budget
from .policies import ByIndex, ByName, ParamInfo, Policy, Schedule
from .specs import (
           SPEC_NAMES,
           codec_for,
           full_precision_codec,
           global_numel,
           keeps_full_precision,
           resolve_codec,
)

__all__ = ["SPEC_NAMES", "Budget", "ByIndex", "ByName", "ParamInfo", "Policy", "Schedule", "codec_for", "full_precision_codec",
           "global_numel", "keeps_full_precision", "resolve_codec"]  # fmt: skip
