"""Golden trajectories: every registry optimizer steps exactly as the recording made before the refactor.

The fixtures in ``tests/golden/`` were written by ``python tests/golden/record.py`` (see its docstring and
``tests/golden/cases.py`` for the model, the gradients and the cases). Each case is rebuilt from what the
fixture recorded (registry name, keyword arguments, dtype), so editing ``cases.py`` cannot silently change
what is compared. Checks, per case:

- its 5-step trajectory: the digest of every parameter after every step, bit for bit;
- its optimizer state after step 5: every recorded state tensor (by key) and every recorded group setting
  that still exists;
- its step-3 checkpoint (``torch.load(weights_only=True)``) loaded into a fresh optimizer continues to the
  recorded step-5 parameters, bit for bit.

The fused CPU kernel and the PyTorch reference path do not give bit-identical numbers, so each has its own
recording: ``trajectories.json`` (fused kernel; also the checkpoints) and ``trajectories_reference.json``
(``EFFOPT_DISABLE_KERNELS=1``; trajectories only). Reductions may round differently on another vector ISA,
so a run on a CPU whose capability differs from the recording's is skipped, saying why. On another torch version the comparison still runs (bit for bit for
our optimizers; torch's own AdamW/Adam/SGD, controls only, fall back to a tolerance).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).resolve().parent / "golden"


def _load_cases_module():
    spec = importlib.util.spec_from_file_location("golden_cases", GOLDEN / "cases.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


cases = _load_cases_module()
FUSED = json.loads((GOLDEN / "trajectories.json").read_text())  # recorded with the fused CPU kernel
REFERENCE_FILE = GOLDEN / "trajectories_reference.json"  # recorded with EFFOPT_DISABLE_KERNELS=1
REFERENCE = json.loads(REFERENCE_FILE.read_text()) if REFERENCE_FILE.exists() else None
IDS = sorted(FUSED["cases"])
CHECKPOINTED = [i for i in IDS if "checkpoint" in FUSED["cases"][i]]


@pytest.fixture(scope="module")
def record() -> dict:
    """The recording made on this machine's step path (fused kernel or reference); skip when there is none
    or when the CPU's vector ISA differs from the recording's (bit identity is not expected then)."""
    now = cases.environment()
    rec = FUSED if now["fused_kernel"] else REFERENCE
    if rec is None or rec["environment"]["fused_kernel"] != now["fused_kernel"]:
        pytest.skip("the fused CPU kernel is unavailable here (EFFOPT_DISABLE_KERNELS=1 or no build) and no "
                    "reference-path recording exists: the fused and reference paths are not bit-identical")  # fmt: skip
    if now["cpu_capability"] != rec["environment"]["cpu_capability"]:
        pytest.skip(f"golden fixtures were recorded on a {rec['environment']['cpu_capability']} CPU, this one is "
                    f"{now['cpu_capability']}: vectorized reductions may round differently")  # fmt: skip
    cases.ensure_registered()
    return rec


def _case(record: dict, case_id: str):
    """The case as recorded (not as ``cases.py`` defines it today)."""
    rec = record["cases"][case_id]
    return cases.Case(case_id, rec["registry"], rec["kwargs"], rec["dtype"], checkpoint="checkpoint" in rec)


def _torch_note(record: dict) -> str:
    if torch.__version__ == record["environment"]["torch"]:
        return ""
    return f" (recorded with torch {record['environment']['torch']}, running torch {torch.__version__})"


def _first_difference(recorded: list[list[str]], now: list[list[str]]) -> str:
    """Which step and parameter first differ, by name."""
    names = list(cases.SHAPES)
    for step, (a, b) in enumerate(zip(recorded, now), start=1):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return f"first difference after step {step} in parameter {names[i]!r}"
    return "different number of steps or parameters"


def _control_close(case) -> None:
    """Torch's own optimizer on another torch version: its final parameters within a tolerance."""
    saved = torch.load(GOLDEN / "checkpoints" / "torch_controls_final.pt", weights_only=True)[case.id]
    torch.manual_seed(0)
    params = cases.make_params(case.dtype)
    cases.run_steps(cases.build(case, params), params, 1, cases.STEPS)
    for p, q in zip(params, saved, strict=True):
        torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case_id", IDS)
def test_trajectory_is_bit_identical(record, case_id):
    case, rec = _case(record, case_id), record["cases"][case_id]
    if case.torch_own and torch.__version__ != record["environment"]["torch"]:
        _control_close(case)
        return
    now = cases.trajectory(case, keep_checkpoint=False)
    note = _torch_note(record)
    assert now["params"] == rec["params"], f"{case_id}: {_first_difference(rec['params'], now['params'])}{note}"
    if case.torch_own:
        return
    changed = sorted(k for k, v in rec["state"].items() if now["state"].get(k) != v)
    assert not changed, f"{case_id}: state after step {cases.STEPS} differs in {changed}{note}"
    settings = sorted(k for k, v in rec["groups"].items() if k in now["groups"] and now["groups"][k] != v)
    assert not settings, f"{case_id}: group settings changed: {settings}"


@pytest.mark.parametrize("case_id", CHECKPOINTED)
def test_checkpoint_resumes_bit_identically(record, case_id):
    if not record["environment"]["fused_kernel"]:
        pytest.skip("the checkpoints' continuation is recorded on the fused-kernel path only")
    case, rec = _case(record, case_id), record["cases"][case_id]
    checkpoint = torch.load(GOLDEN / rec["checkpoint"], weights_only=True)
    final = cases.resume(case, checkpoint, rec["params"][cases.CHECKPOINT_STEP - 1])
    assert final == rec["params"][-1], (
        f"{case_id}: resumed from the step-{cases.CHECKPOINT_STEP} checkpoint, the parameters after step "
        f"{cases.STEPS} differ from the recorded ones{_torch_note(record)}"
    )


def test_recorded_registry_names_still_exist(record):
    """The refactor keeps every registry name (new names are fine: they have no "before" to match)."""
    import efficient_optim as eo

    recorded = {rec["registry"] for rec in record["cases"].values()}
    gone = sorted(recorded - set(eo.list_optimizers()))
    assert not gone, f"registry names gone since the recording: {gone}"
