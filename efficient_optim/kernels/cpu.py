"""Loads the fused CPU kernel, compiled on this machine at first use and cached.

The kernel (``cpu_adamw.cpp``) is built with ``torch.utils.cpp_extension`` into the torch extensions
cache (``$TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``). The first build takes about
a minute on 2 cores; later processes load it in well under a second. When no compiler is present, the
build fails, or ``EFFOPT_DISABLE_KERNELS=1`` is set, ``load_cpu_kernels()`` returns ``None`` and the
optimizers use the plain PyTorch reference path (same results, several times slower).
"""

from __future__ import annotations

import hashlib
import os
import platform
import warnings
from functools import lru_cache
from pathlib import Path

_SOURCE = Path(__file__).with_name("cpu_adamw.cpp")
# -ffp-contract=off keeps a*b+c as two roundings, like the PyTorch reference; -fno-math-errno lets sqrt
# vectorize. No -ffast-math: NaN/Inf and denormal behaviour stay IEEE.
_CFLAGS = ["-O3", "-march=native", "-mprefer-vector-width=256", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-fopenmp"]


def _cpu_fingerprint() -> bytes:
    """The CPU's architecture and feature flags: part of the cache key, because the kernel is built with
    -march=native and a home directory shared by machines with different CPUs must not share the binary."""
    flags = b""
    try:
        for line in Path("/proc/cpuinfo").read_bytes().splitlines():
            if line.startswith((b"flags", b"Features")):
                flags = line
                break
    except OSError:
        pass
    return platform.machine().encode() + flags


def kernels_disabled() -> bool:
    return os.environ.get("EFFOPT_DISABLE_KERNELS", "") not in ("", "0")


@lru_cache(maxsize=1)
def load_cpu_kernels():
    """The compiled module, or ``None`` when it is disabled or cannot be built (with one warning)."""
    if kernels_disabled():
        return None
    try:
        from torch.utils.cpp_extension import load

        digest = hashlib.sha1(_SOURCE.read_bytes() + " ".join(_CFLAGS).encode() + _cpu_fingerprint()).hexdigest()[:10]
        return load(
            name=f"effopt_cpu_{digest}",
            sources=[str(_SOURCE)],
            extra_cflags=_CFLAGS,
            extra_ldflags=["-fopenmp"],
            verbose=os.environ.get("EFFOPT_VERBOSE_BUILD", "") not in ("", "0"),
        )
    except Exception as exc:  # no compiler, no ninja, build error: fall back, say so once
        warnings.warn(
            f"efficient_optim: fused CPU kernel unavailable ({type(exc).__name__}: {str(exc)[:300]}); "
            "using the PyTorch reference path (slower, same results)",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
