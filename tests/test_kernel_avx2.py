"""The AVX2 paths of the CPU kernel on a machine that has AVX-512.

The kernel takes its AVX-512 paths wherever the CPU has them, so on such a machine the AVX2 encoders of the
closed-form maps (kernels/cpu_avx2_closed.h) would go untested. This builds a second kernel with
``EFFOPT_KERNEL_CFLAGS=-mno-avx512f`` (its own cache entry) and runs the closed-form encode/decode tests
against the reference with it, in a subprocess.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from efficient_optim.kernels.cpu import load_cpu_kernels


def _has_avx512() -> bool:
    try:
        return " avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.mark.timeout(900)
@pytest.mark.skipif(load_cpu_kernels() is None, reason="the CPU kernel could not be built here")
@pytest.mark.skipif(not _has_avx512(), reason="no AVX-512: the main kernel tests already run the AVX2 paths")
def test_avx2_closed_form_encoders_equal_the_reference():
    env = dict(os.environ, EFFOPT_KERNEL_CFLAGS="-mno-avx512f")
    tests = Path(__file__).with_name("test_codec_kernels.py")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests), "-k",
                          "sqrt or closed or level"], env=env, capture_output=True, text=True, timeout=850)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout.split("\n")[-2], run.stdout[-500:]
