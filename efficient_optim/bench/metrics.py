"""Measurements taken during a run: memory, the metrics log, and the small statistics the summary needs."""

from __future__ import annotations

import json
import os
import resource
import statistics
from pathlib import Path

import torch

CLEAR_REFS = Path("/proc/self/clear_refs")
PROC_STATUS = Path("/proc/self/status")


def tensor_bytes(tensors) -> int:
    """Bytes of the given tensors (``None`` entries skipped)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set size (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``).

    Returns False where that is not possible; ``peak_rss_bytes`` then reports the process's lifetime peak.
    """
    try:
        CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since the last ``reset_peak_rss`` (or since it started)."""
    try:
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, flushed as written.

    ``truncate_after(step)`` drops lines logged after ``step`` (used on resume, so the steps redone after
    the last checkpoint are not logged twice).
    """

    def __init__(self, path: Path):
        self.path = path

    def truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        keep = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (0 for one value, ``None`` for none)."""
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def update_ratio(before: list[torch.Tensor], params: list[torch.Tensor]) -> float:
    """``||theta_new - theta_old|| / ||theta_old||`` over all parameters together."""
    num = sum(float((p.detach().float() - b.float()).pow(2).sum()) for p, b in zip(params, before))
    den = sum(float(b.float().pow(2).sum()) for b in before)
    return (num / den) ** 0.5 if den > 0 else 0.0


def write_json_atomic(path: Path, data) -> None:
    """Write JSON through a temporary file and ``os.replace``: readers never see a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False))
    os.replace(tmp, path)
