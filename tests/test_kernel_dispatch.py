"""The one kernel-dispatch table: an optimizer steps through whatever kernels the device's provider has.

Triton's kernels run here under its interpreter (``TRITON_INTERPRET=1``, CPU tensors): with them installed as
the CPU provider, QAdamW and HybridAdam must store exactly the parameters, codes and scales of the C++ kernels,
with the quantized pairs of a group stepped in one multi-tensor launch.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import efficient_optim as eo  # noqa: E402
from efficient_optim.kernels import dispatch  # noqa: E402
from efficient_optim.kernels.cpu import load_cpu_kernels  # noqa: E402


def _run(make, steps=3):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in ((48, 128), (64, 96), (200,), (32, 256))]
    opt = make(params)
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i))
        opt.step()
    return [p.detach().clone() for p in params], opt


@pytest.mark.parametrize("make", [
    lambda ps: eo.QAdamW(ps, bits=8, min_quantize_numel=0),
    lambda ps: eo.QAdamW(ps, bits=4, min_quantize_numel=0),
    lambda ps: eo.HybridAdam(ps, min_quantize_numel=0),
], ids=["qadamw8", "qadamw4", "hybrid_adam"])  # fmt: skip
def test_triton_provider_steps_like_the_cpu_kernels_with_one_launch_per_group(make, monkeypatch):
    if load_cpu_kernels() is None:
        pytest.skip("the C++ kernels are not available here")
    from test_triton_kernels import _load_kernels

    expected, ref_opt = _run(make)
    triton = _load_kernels(interpret=True)
    launches = []
    multi = triton.adamw_quantized_multi_step

    def counted(params, *args, **kwargs):
        launches.append(len(params))
        return multi(params, *args, **kwargs)

    namespace = types.SimpleNamespace(**{k: getattr(triton, k) for k in dir(triton) if not k.startswith("_")})
    namespace.adamw_quantized_multi_step = counted
    monkeypatch.setitem(dispatch.PROVIDERS, "cpu", lambda: namespace)
    got, opt = _run(make)
    for a, b in zip(expected, got):
        assert torch.equal(a, b)
    for p_ref, p in zip(ref_opt.state, opt.state):
        for key, t in ref_opt.state[p_ref].items():
            assert torch.equal(t, opt.state[p][key]), key
    if isinstance(opt, eo.HybridAdam):
        assert not launches  # quantized m + factored v: single-tensor kernel
    else:
        assert launches == [4, 4, 4]  # the group's four quantized tensors in one launch per step


@pytest.mark.parametrize("make", [
    lambda ps: eo.Lion(ps, m_bits=8, min_quantize_numel=0),
    lambda ps: eo.Lion(ps, m_bits=4, rounding="stochastic", min_quantize_numel=0),
    lambda ps: eo.SGD(ps, lr=1e-2, nesterov=True, min_quantize_numel=0),
], ids=["lion8", "lion4_stochastic", "sgd8_nesterov"])  # fmt: skip
def test_lion_and_sgd_take_the_triton_kernels_with_the_reference_numbers(make, monkeypatch):
    from test_triton_kernels import _load_kernels, skip_without_exact_fma

    skip_without_exact_fma(torch.device("cpu"))
    expected, ref_opt = _run(make)  # the PyTorch reference path (the C++ kernels have no Lion/SGD step)
    triton = _load_kernels(interpret=True)
    calls = []
    namespace = types.SimpleNamespace(**{k: getattr(triton, k) for k in dir(triton) if not k.startswith("_")})
    for entry in ("lion_quantized_step", "sgd_quantized_step"):
        kernel = getattr(triton, entry)
        setattr(namespace, entry, lambda *a, _k=kernel, _e=entry, **kw: (calls.append(_e), _k(*a, **kw))[1])
    monkeypatch.setitem(dispatch.PROVIDERS, "cpu", lambda: namespace)
    got, opt = _run(make)
    assert calls, "the optimizer stepped through the provider's kernel"
    for a, b in zip(expected, got):
        assert torch.equal(a, b)
    for p_ref, p in zip(ref_opt.state, opt.state):
        for key, t in ref_opt.state[p_ref].items():
            assert torch.equal(t, opt.state[p][key]), key


def _run_bf16(make, steps=3):
    torch.manual_seed(0)
    params = [torch.nn.Parameter((torch.randn(s) * 0.02).bfloat16()) for s in ((48, 128), (64, 96), (200,))]
    opt = make(params)
    for step in range(steps):
        for i, p in enumerate(params):
            g = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i))
            p.grad = g.bfloat16()
        opt.step()
    return [p.detach().clone() for p in params], opt


@pytest.mark.parametrize("make", [
    lambda ps: eo.QAdamW(ps, bits=8, min_quantize_numel=0, correction_bits=16),
    lambda ps: eo.QAdamW(ps, bits=4, min_quantize_numel=0, correction_bits=8),
    lambda ps: eo.QAdamW(ps, bits=8, min_quantize_numel=0, weight_rounding="stochastic"),
    lambda ps: eo.Lion(ps, m_bits=8, min_quantize_numel=0, correction_bits=16),
    lambda ps: eo.Lion(ps, m_bits=4, min_quantize_numel=0, weight_rounding="stochastic"),
    lambda ps: eo.SGD(ps, lr=1e-2, nesterov=True, min_quantize_numel=0, correction_bits=8),
], ids=["qadamw8_corr16", "qadamw4_corr8", "qadamw8_stochastic", "lion8_corr16", "lion4_stochastic",
        "sgd8_corr8"])  # fmt: skip
def test_bf16_weights_step_through_the_kernels_weight_modes(make, monkeypatch):
    """bf16 parameters with correction codes or stochastic weight rounding: the Triton provider steps the bf16
    storage itself (no master round trip) and stores exactly what the CPU path stores (C++ kernel or
    reference around an fp32 master): parameters, correction codes, moment codes and scales."""
    from test_triton_kernels import _load_kernels, skip_without_exact_fma

    probe = make([torch.nn.Parameter(torch.zeros(1))])
    if isinstance(probe, eo.QAdamW):
        if load_cpu_kernels() is None:
            pytest.skip("the C++ kernels are not available here")
    else:
        skip_without_exact_fma(torch.device("cpu"))
    expected, ref_opt = _run_bf16(make)
    triton = _load_kernels(interpret=True)
    weight_calls = []
    namespace = types.SimpleNamespace(**{k: getattr(triton, k) for k in dir(triton) if not k.startswith("_")})
    for entry in ("adamw_quantized_multi_step", "lion_quantized_step", "sgd_quantized_step"):
        kernel = getattr(triton, entry)

        def counted(first, *a, _k=kernel, **kw):
            p = first[0] if isinstance(first, list) else first
            weight_calls.append((p.dtype, sorted(kw)))
            return _k(first, *a, **kw)

        setattr(namespace, entry, counted)
    monkeypatch.setitem(dispatch.PROVIDERS, "cpu", lambda: namespace)
    got, opt = _run_bf16(make)
    assert weight_calls and all(dtype == torch.bfloat16 and kw for dtype, kw in weight_calls), weight_calls
    for a, b in zip(expected, got):
        assert a.dtype == torch.bfloat16 and torch.equal(a.view(torch.int16), b.view(torch.int16))
    for p_ref, p in zip(ref_opt.state, opt.state):
        assert ref_opt.state[p_ref].keys() == opt.state[p].keys()
        for key, t in ref_opt.state[p_ref].items():
            assert torch.equal(t, opt.state[p][key]), key


def test_odd_block_sizes_take_the_reference_path_where_the_kernel_needs_even_ones():
    """QAdamW accepts odd blocks at 8 bits; the C++ step kernel does not: such a parameter takes the reference
    path (what ``fused=False`` computes) instead of raising."""
    if load_cpu_kernels() is None:
        pytest.skip("the C++ kernels are not available here")

    def make(fused):
        return lambda ps: eo.QAdamW(ps, bits=8, m_block_size=65, v_block_size=65, min_quantize_numel=0, fused=fused)

    got, _ = _run(make(None))
    expected, _ = _run(make(False))
    for a, b in zip(expected, got):
        assert torch.equal(a, b)
    assert not dispatch._block_ok(load_cpu_kernels(), 65) and dispatch._block_ok(load_cpu_kernels(), 64)
