"""The AVX2 paths of the CPU kernel on a machine that has AVX-512.

The kernel takes its AVX-512 paths wherever the CPU has them, so on such a machine the AVX2 encoders of the
closed-form maps (kernels/cpu_avx2_closed.h) would go untested. This builds a second kernel with
``EFFOPT_KERNEL_CFLAGS=-mno-avx512f`` (its own cache entry) and runs the closed-form encode/decode tests
against the reference with it, in a subprocess; and it checks that optimizer steps through the AVX-512 paths
(one-pass decode + update, HybridAdam's rows, the encoders) store exactly what the other paths store.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


@pytest.mark.timeout(900)
@pytest.mark.skipif(load_cpu_kernels() is None, reason="the CPU kernel could not be built here")
@pytest.mark.skipif(not _has_avx512(), reason="no AVX-512: only one set of kernel paths on this CPU")
def test_avx512_steps_store_exactly_what_the_other_paths_store(tmp_path):
    worker = Path(__file__).with_name("kernel_paths_worker.py")
    outputs = {}
    for name, flags in (("avx512", ""), ("avx2", "-mno-avx512f")):
        env = dict(os.environ, EFFOPT_KERNEL_CFLAGS=flags)
        run = subprocess.run([sys.executable, str(worker), str(tmp_path / f"{name}.pt")], env=env,
                             capture_output=True, text=True, timeout=850)  # fmt: skip
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        outputs[name] = torch.load(tmp_path / f"{name}.pt")
    assert outputs["avx512"].keys() == outputs["avx2"].keys() and len(outputs["avx512"]) == 50
    differ = [key for key, tensors in outputs["avx512"].items()
              if not all(torch.equal(a, b) for a, b in zip(tensors, outputs["avx2"][key], strict=True))]  # fmt: skip
    assert not differ, differ
