"""Compile the Triton kernels for an NVIDIA GPU on a machine without one, and check their arithmetic.

Triton's NVIDIA backend (with its bundled ``ptxas``) compiles to PTX and a cubin without a device, so a
CPU-only machine can still check that every kernel specialization builds for a GPU architecture and that the
PTX keeps the IEEE arithmetic the bit-exactness rests on: no approximate division, reciprocal or square root
(``div.full``, ``*.approx``), and no fused multiply-add that the source did not ask for (launches use
``enable_fp_fusion=False``; ``tl.fma`` is the only source of ``fma.rn.f32``).

Usage (what ``tests/test_triton_kernels.py`` does in a subprocess without ``TRITON_INTERPRET``)::

    from efficient_optim.kernels import triton_compile
    with triton_compile.capture() as launches:   # run entry points on CPU tensors; nothing executes
        triton_adamw.adamw_quantized_step(...)
    for launch in launches:
        problems = triton_compile.check_ptx(triton_compile.compile_launch(launch, arch=90), fma_allowed=False)
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

from . import triton_common

APPROXIMATE = re.compile(
    r"\b(div\.full|div\.approx|rcp\.approx|sqrt\.approx|rsqrt\.approx|ex2\.approx|lg2\.approx)"
)


@dataclass
class Launch:
    """One kernel launch as the wrappers prepared it: the JIT function, grid, runtime args and constexprs."""

    kernel: object
    grid: tuple
    args: dict
    constants: dict
    tile: int


@contextlib.contextmanager
def capture():
    """Within the block, entry points accept CPU tensors and record their launches instead of running them.

    Yields the list of ``Launch`` records. Needs Triton's compiled mode (``TRITON_INTERPRET`` unset)."""
    if triton_common.interpreting():
        raise RuntimeError("capture() needs Triton's compiled mode: unset TRITON_INTERPRET")
    launches: list[Launch] = []
    saved_recorder, saved_ok = triton_common.RECORDER, triton_common.kernel_device_ok
    triton_common.RECORDER = lambda *launch: launches.append(Launch(*launch))
    triton_common.kernel_device_ok = lambda t: t.device.type in ("cpu", "cuda")
    try:
        yield launches
    finally:
        triton_common.RECORDER, triton_common.kernel_device_ok = saved_recorder, saved_ok


def _signature(launch: Launch) -> tuple[dict, dict]:
    """Triton's signature and constexprs for ``launch``, specialized the way a real launch would be."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    kernel = launch.kernel
    signature, constexprs = {}, {}
    for param in kernel.params:
        name = param.name
        if name in launch.constants:
            value = launch.constants[name]
            signature[name] = "constexpr"
            constexprs[name] = value
            continue
        value = launch.args[name]
        kind, _ = native_specialize_impl(BaseBackend, value, False, not param.do_not_specialize, True)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = value
    return signature, constexprs


def compile_launch(launch: Launch, arch: int = 90) -> str:
    """Compile ``launch``'s kernel specialization for ``sm_{arch}`` (PTX and cubin); returns the PTX."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs = _signature(launch)
    src = ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs)
    options = {"num_warps": triton_common.num_warps_for(launch.tile), "enable_fp_fusion": False}
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    return compiled.asm["ptx"]


def check_ptx(ptx: str, fma_allowed: bool) -> list[str]:
    """Problems with ``ptx``'s arithmetic (empty when none): approximate operations, and any ``fma.rn.f32``
    unless the kernel writes ``tl.fma`` itself (``fma_allowed``)."""
    problems = [f"approximate operation: {m.group(0)}" for m in APPROXIMATE.finditer(ptx)]
    if not fma_allowed and re.search(r"\bfma\.rn\.f32\b", ptx):
        problems.append("contracted fma.rn.f32 in a kernel that asks for none")
    return problems
