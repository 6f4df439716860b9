"""The probe's records: the JSON-lines file ``StateProbe`` appends to, reading it back, and the error
series and growth fits computed from the records (``analysis.stats.growth_exponent``)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from .stats import growth_exponent


class JsonLinesLog:
    """Appends records to a JSON-lines file (``path`` None: writes nothing); ``truncate_after(step)`` drops the
    lines of later steps (a resumed run does not log them twice)."""

    def __init__(self, path: Path | None):
        self.path = Path(path) if path is not None else None

    def truncate_after(self, step: int) -> None:
        if self.path is None or not self.path.is_file():
            return
        keep = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(self.path)

    def write(self, records: list[dict]) -> None:
        if self.path is None or not records:
            return
        with self.path.open("a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")


def read_probes(path) -> list[dict]:
    """The records of a ``probes.jsonl`` file."""
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def error_series(records: list[dict], state: str, param_filter: Callable[[str], bool] | None = None) -> dict:
    """Per step: total error norm (sqrt of summed err_l2^2) and mean relative error of one state."""
    by_step: dict[int, list[dict]] = {}
    for r in records:
        if r.get("kind") == "state" and r.get("state") == state and "err_l2" in r:
            if param_filter is None or param_filter(r["param"]):
                by_step.setdefault(r["step"], []).append(r)
    steps = sorted(by_step)
    total = [math.sqrt(sum(x["err_l2"] ** 2 for x in by_step[s])) for s in steps]
    rel = []
    for s in steps:
        vals = [x["err_rel_l2"] for x in by_step[s] if x.get("err_rel_l2") is not None]
        rel.append(sum(vals) / len(vals) if vals else None)
    return {"steps": steps, "err_l2": total, "err_rel_l2": rel}


def error_growth(records: list[dict], min_step: int = 1) -> dict:
    """``{state: {"abs": fit, "rel": fit}}`` of the error series in ``records`` (fits may be None)."""
    states = sorted({r["state"] for r in records if r.get("kind") == "state" and "err_l2" in r})
    out = {}
    for s in states:
        ser = error_series(records, s)
        out[s] = {"abs": growth_exponent(ser["steps"], ser["err_l2"], min_step),
                  "rel": growth_exponent(ser["steps"], ser["err_rel_l2"], min_step)}  # fmt: skip
    return out
