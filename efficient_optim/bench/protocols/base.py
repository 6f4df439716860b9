"""The protocol interface: what a research protocol defines (its runs, its verdicts, its report sections) and the
helpers verdicts are written with.

A protocol is an instance of a ``Protocol`` subclass, named ``PROTOCOL`` in its own module of this package
(``bench.protocols`` finds it there). ``effopt suite NAME`` plans its runs, trains them with the harness's one
runner (``bench.runner.run_matrix``: resumable, with the protocol's callbacks), then asks it for verdicts and
report sections.

Every criterion ends as a ``Verdict``: **met**, **not met**, **not measurable here** (with the reason: a
missing optimizer, runs too short for the criterion, ...), **measured** (a number without a target) or, for a
``--quick`` run, **indicative** (which way a criterion points, never that it is met or failed).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ...registry import list_optimizers, optimizer_entry
from ..config import RunConfig
from ..report import Group, seed_spread

MET, NOT_MET, NOT_MEASURABLE = "met", "not met", "not measurable here"
INDICATIVE = "indicative"


@dataclass
class Verdict:
    """One criterion of a protocol, for one subject (an optimizer or a setting).

    Args:
        criterion: what is judged, in words.
        subject: whom it is judged for (an optimizer spec, a group label, ``-``).
        measured: the measured value, as shown.
        verdict: ``MET``, ``NOT_MET``, ``NOT_MEASURABLE``, ``INDICATIVE`` or ``"measured"``.
        reason: why (required for not measurable and indicative verdicts; default empty).
    """

    criterion: str
    subject: str
    measured: str
    verdict: str
    reason: str = ""


class Protocol:
    """Base of a research protocol run by ``effopt suite``.

    Attributes a protocol sets: ``name`` (the user-facing name: what it does, e.g. ``baselines``), ``aliases``
    (other accepted names: its protocol id, e.g. ``("p1",)``), ``protocol_id`` (``P1``; empty when it has none),
    ``title`` (the report's heading), ``defaults`` (the run options' defaults), ``quick_steps`` (steps of a
    ``--quick`` run) and ``seeds`` (seeds of a full run).
    """

    name = ""
    aliases: tuple[str, ...] = ()
    protocol_id = ""
    title = ""
    defaults = RunConfig(steps=300, context=64, batch_size=16, lr=3e-3, eval_every=50)
    quick_steps = 60
    seeds = 3

    def plan(self, base: RunConfig, seeds: int, quick: bool) -> tuple[list[RunConfig], list[Verdict]]:
        """The runs, and verdicts for what cannot run here (missing optimizers).

        Args:
            base: the run options the user gave (over this protocol's ``defaults``).
            seeds: seeds of the main comparison.
            quick: a ``--quick`` run (fewer steps, smaller sweeps).
        """
        raise NotImplementedError

    def verdicts(self, runs: list[dict], out: Path, base: RunConfig) -> list[Verdict]:
        """Every criterion's verdict from the finished runs' summary rows (and their files under ``out``)."""
        raise NotImplementedError

    def add_options(self, ap: argparse.ArgumentParser) -> None:
        """The protocol's own command-line options (none by default)."""

    def configure(self, args: argparse.Namespace) -> None:
        """Read the protocol's own options before ``plan`` (``UsageError`` for bad values)."""

    def callbacks(self, cfg: RunConfig) -> list:
        """Fresh ``bench.callbacks.Callback`` objects (probes, controllers) for one of its runs (none by default)."""
        return []

    def sections(self, runs: list[dict], out: Path, base: RunConfig) -> list[str]:
        """Extra markdown sections of ``report.md``, after the verdicts (none by default)."""
        return []

    def table_target(self, runs: list[dict]) -> float | None:
        """The perplexity the report table's steps-to-target column measures (default: the runs' own)."""
        return None

    @property
    def names(self) -> tuple[str, ...]:
        """Every name ``effopt suite`` accepts for it: ``name`` first, then the aliases."""
        return (self.name, *self.aliases)


# ----------------------------------------------------------------------------------- verdict helpers
def available(name: str) -> bool:
    """Whether optimizer ``name`` is registered and its optional package installed."""
    return name in list_optimizers() and optimizer_entry(name).available()


def why_missing(name: str) -> str:
    """Why optimizer ``name`` cannot run here, in words."""
    if name not in list_optimizers():
        return f"{name} is not in this version of the library"
    return f"{name} needs `pip install {optimizer_entry(name).requires}`"


def pct(x: float | None) -> str:
    """A relative change as ``+1.23%`` (``n/a`` for ``None``)."""
    return "n/a" if x is None else f"{x * 100:+.2f}%"


def find_group(groups: list[Group], spec: str, settings: str | None = None) -> Group | None:
    """The group of ``spec`` (in ``settings`` when given) that has finished runs, or ``None``."""
    for g in groups:
        if g.optimizer == spec and (settings is None or g.settings == settings) and g.ok:
            return g
    return None


def relative(g: Group, base: Group, key: str) -> float | None:
    """``mean(g[key]) / mean(base[key]) - 1`` over finished seeds (``None`` when not measurable)."""
    a, b = g.stat(key)[0], base.stat(key)[0]
    return None if a is None or not b else a / b - 1


def check(criterion: str, subject: str, value: float | None, ok, measured: str, missing: str = "") -> Verdict:
    """``MET`` / ``NOT_MET`` by ``ok(value)``; ``NOT_MEASURABLE`` (with ``missing`` as the reason) for ``None``."""
    if value is None:
        return Verdict(criterion, subject, "n/a", NOT_MEASURABLE, missing or "no finished run to measure")
    return Verdict(criterion, subject, measured, MET if ok(value) else NOT_MET)


def quality_check(criterion: str, g: Group, ref: Group, value: float | None, ok, measured: str) -> Verdict:
    """``check`` for a quality gap: indicative with one seed on either side, the seed spread in the reason."""
    v = check(criterion, g.label, value, ok, measured)
    if value is None:
        return v
    spread = seed_spread(g, ref)
    if spread == "unknown":
        return dataclasses.replace(v, verdict=INDICATIVE, reason=f"one seed: points to '{v.verdict}'; the seed spread is unknown")
    return dataclasses.replace(v, reason=f"gap {spread} the seed spread ({len(g.ok)} vs {len(ref.ok)} seeds)")


def indicative(verdicts: list[Verdict], base: RunConfig, seeds: int) -> list[Verdict]:
    """A quick run's verdicts: met / not met become ``indicative``, the direction kept in the reason."""
    out = []
    for v in verdicts:
        if v.verdict in (MET, NOT_MET):
            why = f"quick run ({base.steps} steps, {seeds} seed(s)): points to '{v.verdict}'"
            v = dataclasses.replace(v, verdict=INDICATIVE, reason=f"{why}; {v.reason}" if v.reason else why)
        out.append(v)
    return out


def verdict_markdown(title: str, verdicts: list[Verdict]) -> str:
    """The verdict table of ``report.md``."""
    lines = [f"## Verdicts: {title}", "", "| criterion | subject | measured | verdict | why |", "|---|---|---|---|---|"]
    lines += [f"| {v.criterion} | {v.subject} | {v.measured} | **{v.verdict}** | {v.reason} |" for v in verdicts]
    return "\n".join(lines) + "\n"
