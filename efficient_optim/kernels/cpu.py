"""Loads the fused CPU kernel, compiled on this machine at first use and cached.

The kernel (``cpu_adamw.cpp``) is built with ``torch.utils.cpp_extension`` into its own folder of the torch
extensions cache (``$TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``), named by a digest of
everything that changes the binary (see ``build_key``): two virtual environments, two torch installs or two
CPUs sharing a home directory each get their own build and never rebuild or load each other's. The first
build takes about a minute on 2 cores and says so on stderr (one line before, the time after); later
processes load it in well under a second, silently. When no compiler is present, the build fails, or
``EFFOPT_DISABLE_KERNELS=1`` is set, ``load_cpu_kernels()`` returns ``None`` (after one warning for a failed
build) and the optimizers use the plain PyTorch reference path (the same arithmetic to within float rounding, several times slower).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import sysconfig
import time
import warnings
from functools import lru_cache
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("cpu_adamw.cpp")
# headers the source includes (one translation unit); their text is part of the build key
_HEADERS = tuple(Path(__file__).with_name(h) for h in ("cpu_maps.h", "cpu_avx2_closed.h", "cpu_avx512.h", "cpu_codec.h"))
# -ffp-contract=off keeps a*b+c as two roundings, like the PyTorch reference; -fno-math-errno lets sqrt
# vectorize. No -ffast-math: NaN/Inf and denormal behaviour stay IEEE.
_CFLAGS = ["-O3", "-march=native", "-mprefer-vector-width=256", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]


def _cflags() -> list[str]:
    """The compiler flags: ``_CFLAGS`` plus ``$EFFOPT_KERNEL_CFLAGS`` (split like a shell line; e.g.
    ``-mno-avx512f`` builds the AVX2 paths on an AVX-512 machine, as the tests do). Part of the build key."""
    return _CFLAGS + shlex.split(os.environ.get("EFFOPT_KERNEL_CFLAGS", ""))
_LIB_SUFFIXES = (".so", ".pyd", ".dylib")  # what torch names the built module on Linux, Windows, macOS


def _cpu_fingerprint() -> str:
    """The CPU's architecture and feature flags: the kernel is built with -march=native, so a home
    directory shared by machines with different CPUs must not share the binary."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return platform.machine() + " " + (flags or platform.processor())


@lru_cache(maxsize=1)
def _compiler_version() -> str:
    """First line of ``$CXX --version`` (torch builds with ``$CXX``, default ``c++``); empty if it cannot run."""
    cxx = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return f"{cxx}: {out.strip().splitlines()[0] if out.strip() else ''}"


def _sources_digest() -> str:
    """SHA-256 of the kernel source and the headers it includes, in order."""
    digest = hashlib.sha256()
    for path in (_SOURCE, *_HEADERS):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def build_key(**overrides) -> dict:
    """Everything that changes the compiled binary, as a dict of strings (the cache is keyed by its digest).

    Args:
        **overrides: replace entries (testing, or to see which input changes the key): ``torch_version``,
            ``torch_path``, ``torch_cxx11_abi``, ``python``, ``cflags``, ``ldflags``, ``cpu``, ``compiler``,
            ``source_sha256``.
    """
    key = {
        "torch_version": f"{torch.__version__} {torch.version.git_version}",
        "torch_path": str(Path(torch.__file__).resolve().parent),  # a second venv's torch is another install
        "torch_cxx11_abi": str(torch._C._GLIBCXX_USE_CXX11_ABI),
        "python": f"{sys.implementation.cache_tag} {sysconfig.get_config_var('EXT_SUFFIX')} {sys.abiflags}",
        "cflags": " ".join(_cflags()),
        "ldflags": " ".join(_LDFLAGS),
        "cpu": _cpu_fingerprint(),
        "compiler": _compiler_version(),
        "source_sha256": _sources_digest(),
    }
    unknown = set(overrides) - set(key)
    if unknown:
        raise ValueError(f"build_key: unknown entries {sorted(unknown)}; known: {sorted(key)}")
    key.update({k: str(v) for k, v in overrides.items()})
    return key


def kernel_name(key: dict) -> str:
    """The extension's module (and cache folder) name for ``key``: ``effopt_cpu_<20 hex digits>``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return f"effopt_cpu_{digest}"


def build_directory(name: str) -> Path:
    """The cache folder of the extension ``name``: ``$TORCH_EXTENSIONS_DIR/<name>`` (default root
    ``~/.cache/torch_extensions``)."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / name


def is_built(name: str, directory: Path) -> bool:
    """Whether ``directory`` already holds the compiled module ``name`` (then loading it does not compile)."""
    return any((directory / f"{name}{suffix}").is_file() for suffix in _LIB_SUFFIXES)


def _say(message: str) -> None:
    """One line on stderr, above any tqdm progress bar (a plain print would break the bar's line)."""
    try:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)
    except ImportError:
        print(message, file=sys.stderr, flush=True)


def kernels_disabled() -> bool:
    """Whether ``EFFOPT_DISABLE_KERNELS`` is set to anything but ``""`` or ``"0"``."""
    return os.environ.get("EFFOPT_DISABLE_KERNELS", "") not in ("", "0")


def _build_and_load(name: str, directory: Path):
    """``torch.utils.cpp_extension.load`` of the kernel into ``directory``, announced when it compiles."""
    from torch.utils.cpp_extension import load

    compiling = not is_built(name, directory)
    if compiling:
        _say("efficient_optim: building the fused CPU kernel (first use with this torch, compiler and CPU; "
             f"about a minute on 2 cores) into {directory} ...")  # fmt: skip
    start = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    module = load(
        name=name,
        sources=[str(_SOURCE)],
        extra_cflags=_cflags(),
        extra_ldflags=_LDFLAGS,
        build_directory=str(directory),
        verbose=os.environ.get("EFFOPT_VERBOSE_BUILD", "") not in ("", "0"),
    )
    if compiling:
        _say(f"efficient_optim: fused CPU kernel built in {time.perf_counter() - start:.0f} s (cached for later runs)")
    return module


@lru_cache(maxsize=1)
def load_cpu_kernels():
    """The compiled module, or ``None`` when it is disabled or cannot be built (with one warning)."""
    if kernels_disabled():
        return None
    try:
        name = kernel_name(build_key())
        return _build_and_load(name, build_directory(name))
    except Exception as exc:  # no compiler, no ninja, build error: fall back, say so once
        warnings.warn(
            f"efficient_optim: fused CPU kernel unavailable ({type(exc).__name__}: {str(exc)[:300]}); "
            "using the PyTorch reference path (slower; equal to float rounding)",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
