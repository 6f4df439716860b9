"""The CPU kernel's cache key, its build notice and its fallback, without compiling anything."""

import warnings

import pytest
import torch

from efficient_optim.kernels import cpu


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """``load_cpu_kernels`` with an empty cache folder and its memo cleared before and after the test."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("EFFOPT_DISABLE_KERNELS", raising=False)
    cpu.load_cpu_kernels.cache_clear()
    yield tmp_path
    cpu.load_cpu_kernels.cache_clear()  # later tests load the real kernel again


def test_every_input_of_the_binary_changes_the_key(monkeypatch):
    base = cpu.kernel_name(cpu.build_key())
    assert base == cpu.kernel_name(cpu.build_key()) and base.startswith("effopt_cpu_")
    for entry in ("torch_version", "torch_path", "python", "cflags", "cpu", "compiler", "source_sha256"):
        assert cpu.kernel_name(cpu.build_key(**{entry: "something else"})) != base, entry
    monkeypatch.setattr(torch, "__file__", "/another/venv/lib/python3.11/site-packages/torch/__init__.py")
    assert cpu.build_key()["torch_path"] == "/another/venv/lib/python3.11/site-packages/torch"
    assert cpu.kernel_name(cpu.build_key()) != base  # a second venv's torch: its own build folder
    with pytest.raises(ValueError, match="unknown entries"):
        cpu.build_key(torch_pth="x")


def test_build_folder_is_per_key_under_torch_extensions_dir(fresh_loader):
    name = cpu.kernel_name(cpu.build_key())
    assert cpu.build_directory(name) == fresh_loader / name
    other = cpu.kernel_name(cpu.build_key(torch_path="/elsewhere"))
    assert cpu.build_directory(other) != cpu.build_directory(name)


def _fake_load(calls):
    def load(name, build_directory, **kw):
        calls.append((name, build_directory))
        return "module"

    return load


def test_notice_before_and_time_after_only_when_it_compiles(fresh_loader, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(torch.utils.cpp_extension, "load", _fake_load(calls))
    assert cpu.load_cpu_kernels() == "module"
    err = capsys.readouterr().err
    assert "building the fused CPU kernel" in err and "fused CPU kernel built in" in err
    name, directory = calls[0]
    assert directory == str(fresh_loader / name)

    (fresh_loader / name / f"{name}.so").write_bytes(b"")  # as if built: a cached load says nothing
    cpu.load_cpu_kernels.cache_clear()
    assert cpu.load_cpu_kernels() == "module"
    assert capsys.readouterr().err == ""


def test_failed_build_falls_back_to_the_reference_path_with_one_warning(fresh_loader, monkeypatch):
    def broken(**kw):
        raise RuntimeError("Error building extension 'effopt_cpu': c++ not found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cpu.load_cpu_kernels() is None
        assert cpu.load_cpu_kernels() is None  # remembered: no second attempt, no second warning
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1
    assert "fused CPU kernel unavailable" in messages[0] and "c++ not found" in messages[0]
    assert "reference path" in messages[0]


def test_disabled_kernels_are_not_built(fresh_loader, monkeypatch):
    monkeypatch.setenv("EFFOPT_DISABLE_KERNELS", "1")
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda **kw: pytest.fail("built while disabled"))
    assert cpu.load_cpu_kernels() is None


def test_bench_loads_the_kernel_before_its_runs_only_when_one_will_use_it(monkeypatch):
    from efficient_optim.bench import quick
    from efficient_optim.bench.config import RunConfig

    calls = []
    monkeypatch.setattr(quick, "load_cpu_kernels", lambda: calls.append(1))
    quick.load_kernel_first([RunConfig(optimizer="adamw", device="cpu"), RunConfig(optimizer="adamw_bnb_8bit", device="cpu")])
    assert calls == []  # torch's and third-party optimizers never use it: no build for them
    quick.load_kernel_first([RunConfig(optimizer="adamw", device="cpu"), RunConfig(optimizer="qadamw8+bits=4", device="cpu")])
    assert calls == [1]
