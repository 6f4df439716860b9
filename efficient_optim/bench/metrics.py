"""Measurements taken during a run: memory, the metrics log, and the small statistics the summary needs."""

from __future__ import annotations

import json
import os
import resource
import statistics
import time
from pathlib import Path

import torch

from ..files import write_json_atomic  # noqa: F401  (re-exported: bench.metrics.write_json_atomic)

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


def quartiles(values: list[float]) -> tuple[float | None, float | None, float | None]:
    """First quartile, median and third quartile (``None`` each for no values; all equal for one)."""
    if not values:
        return None, None, None
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


# A run's timing is flagged as not comparable when the machine's 1-minute load average exceeded its cores by
# more than this: the run itself accounts for up to all cores, anything beyond is other work competing.
LOAD_MARGIN = 0.5


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_snapshot() -> dict:
    """Machine load and this process's clocks now: pass two of them to ``load_summary``."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = None
    return {"load": load, "cpu_s": time.process_time(), "wall_s": time.perf_counter()}


def load_summary(start: dict, end: dict, threads: int) -> dict:
    """The load fields of a run's summary row, from snapshots at its start and end.

    Args:
        start, end: ``load_snapshot()`` taken before the first and after the last training step.
        threads: threads the run computes with (``torch.get_num_threads()``).

    ``timing_loaded`` is True when the 1-minute load average at either end exceeded the machine's cores by more
    than ``LOAD_MARGIN``: other work competed for the CPU, so this run's step times are not comparable with
    those of runs measured on an idle machine. ``cpu_per_wall`` is the process's CPU time over wall time.
    """
    loads = [s["load"] for s in (start, end) if s["load"] is not None]
    cores = usable_cores()
    wall = end["wall_s"] - start["wall_s"]
    return {
        "load_avg_start": start["load"], "load_avg_end": end["load"], "cpu_cores": cores, "torch_threads": threads,
        "cpu_per_wall": (end["cpu_s"] - start["cpu_s"]) / wall if wall > 0 else None,
        "timing_loaded": bool(loads) and max(loads) > cores + LOAD_MARGIN,
    }  # fmt: skip


def update_ratio(before: list[torch.Tensor], params: list[torch.Tensor]) -> float:
    """``||theta_new - theta_old|| / ||theta_old||`` over all parameters together."""
    num = sum(float((p.detach().float() - b.float()).pow(2).sum()) for p, b in zip(params, before))
    den = sum(float(b.float().pow(2).sum()) for b in before)
    return (num / den) ** 0.5 if den > 0 else 0.0
