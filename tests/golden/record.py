"""Record the golden trajectories and checkpoints: ``python tests/golden/record.py`` (a script, not a test).

Writes ``tests/golden/trajectories.json`` (environment, and per case the parameter digests after each of
``STEPS`` steps, the state digests and group settings after the last step) and, per case with a
checkpoint, ``tests/golden/checkpoints/<case>.pt``: ``{"params": [...], "optimizer": state_dict}`` after
step ``CHECKPOINT_STEP`` (``torch.load(weights_only=True)`` loads it). Torch's own optimizers (controls)
also get their final parameters in ``checkpoints/torch_controls_final.pt`` for a tolerance comparison
when the test runs on another torch version. With ``EFFOPT_DISABLE_KERNELS=1`` it records the PyTorch
reference path's trajectories into ``trajectories_reference.json`` instead (no checkpoints). Each case runs twice; a case whose two runs differ is an
error (it could never be a golden fixture). Re-record only on purpose: the fixtures are the reference
that the refactor of issue 12 must reproduce bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import cases  # noqa: E402


def record_case(case: cases.Case, out: Path) -> tuple[dict, list[torch.Tensor] | None]:
    """Run ``case`` twice (must agree), save its checkpoint; its JSON entry and, for controls, final params."""
    first, second = cases.trajectory(case), cases.trajectory(case)
    if first["params"] != second["params"] or first["state"] != second["state"]:
        raise RuntimeError(f"{case.id}: two runs from the same seed differ; not recordable")
    entry = {"registry": case.registry, "kwargs": case.kwargs, "dtype": case.dtype,
             "params": first["params"], "state": first["state"], "groups": first["groups"]}  # fmt: skip
    if case.checkpoint:
        path = out / "checkpoints" / cases.file_name(case.id)
        torch.save(first["checkpoint"], path)
        torch.load(path, weights_only=True)  # the format the test (and users) load
        entry["checkpoint"] = path.relative_to(out).as_posix()
    final = None
    if case.torch_own:
        final = _final_params(case)
    return entry, final


def _final_params(case: cases.Case) -> list[torch.Tensor]:
    """The parameters after ``STEPS`` steps (kept as tensors for the torch-version tolerance fallback)."""
    torch.manual_seed(0)
    params = cases.make_params(case.dtype)
    cases.run_steps(cases.build(case, params), params, 1, cases.STEPS)
    return [p.detach().clone() for p in params]


def main() -> None:
    """Record every case into ``tests/golden/`` (trajectories only on the reference path)."""
    env = cases.environment()
    fused = env["fused_kernel"]
    if fused:
        (HERE / "checkpoints").mkdir(exist_ok=True)
        for old in (HERE / "checkpoints").glob("*.pt"):
            old.unlink()
    recorded, controls = {}, {}
    for case in cases.all_cases():
        if not fused:
            case = dataclasses.replace(case, checkpoint=False)
        start = time.perf_counter()
        recorded[case.id], final = record_case(case, HERE)
        if final is not None:
            controls[case.id] = final
        print(f"{case.id:55s} {time.perf_counter() - start:5.2f} s", flush=True)
    if fused:
        torch.save(controls, HERE / "checkpoints" / "torch_controls_final.pt")
    meta = {**env, "steps": cases.STEPS, "checkpoint_step": cases.CHECKPOINT_STEP, "lr": cases.LR,
            "threads": torch.get_num_threads()}  # fmt: skip
    doc = {"environment": meta, "cases": recorded}
    (HERE / ("trajectories.json" if fused else "trajectories_reference.json")).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    size = sum(f.stat().st_size for f in HERE.rglob("*") if f.is_file() and f.suffix in (".pt", ".json"))
    print(f"{len(recorded)} cases; environment {meta}; fixtures {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
