"""Policies: which codec each parameter's states get."""

from .static import codec_for, global_numel, moment_codec

__all__ = ["codec_for", "global_numel", "moment_codec"]
