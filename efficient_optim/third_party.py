"""Keeps optional baselines' chatter (bitsandbytes, torchao, transformers' quantizers) out of a job's output.

Importing or building a third-party optimizer can print failed ``.so`` loads, "kernels-community" notices
and torch deprecation warnings that interleave with a progress bar and read like errors. Inside
``chatter_to(path)``, every block run under ``quiet(what)`` — the registry wraps the import and construction
of each optional baseline in one — has its warnings, log records and stdout/stderr output (Python and
file-descriptor level, so C-level prints too) go to a ``ChatterLog`` instead: held in memory until the job
has an output folder (``ChatterLog.keep_in``), then appended to a file there. Outside ``chatter_to`` (a
user's own script) ``quiet`` changes nothing: the packages speak as they normally do.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path


class ChatterLog:
    """Where ``quiet`` blocks' output goes: kept in memory until ``keep_in(path)``, then appended to ``path``."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self._pending: list[str] = []

    def write(self, text: str) -> None:
        """Append ``text`` to the file, or hold it until ``keep_in``."""
        if self.path is None:
            self._pending.append(text)
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)

    def keep_in(self, path: str | Path) -> None:
        """From now on write into ``path`` (appended; its folder is created once there is text to write).

        Args:
            path: the log file, e.g. ``<output folder>/third_party.log``.
        """
        self.path = Path(path)
        if self._pending:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.write("".join(self._pending))
            self._pending.clear()


_LOG: ContextVar[ChatterLog | None] = ContextVar("efficient_optim_third_party_log", default=None)
_CAPTURING: ContextVar[bool] = ContextVar("efficient_optim_third_party_capturing", default=False)


@contextlib.contextmanager
def chatter_to(log: ChatterLog) -> Iterator[ChatterLog]:
    """While active, ``quiet`` blocks write their output into ``log`` instead of the terminal.

    Args:
        log: the ``ChatterLog`` that receives it.
    """
    token = _LOG.set(log)
    try:
        yield log
    finally:
        _LOG.reset(token)


def _flush(*streams) -> None:
    for s in streams:
        with contextlib.suppress(Exception):
            s.flush()


def _redirect_fds(target: int) -> dict[int, int]:
    """Point file descriptors 1 and 2 at ``target``; the saved originals (none where they cannot be dup'ed)."""
    saved = {}
    for fd in (1, 2):
        try:
            saved[fd] = os.dup(fd)
            os.dup2(target, fd)
        except OSError:
            saved.pop(fd, None)
    return saved


def _restore_fds(saved: dict[int, int]) -> None:
    for fd, copy in saved.items():
        os.dup2(copy, fd)
        os.close(copy)


@contextlib.contextmanager
def _captured(log: ChatterLog, what: str) -> Iterator[None]:
    streams = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    _flush(*streams)
    text = io.StringIO()
    with tempfile.TemporaryFile() as sink:
        saved = _redirect_fds(sink.fileno())
        try:
            with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
                yield
        finally:
            # log handlers keep the original stream objects: what they buffered goes to the log, not the terminal
            _flush(*streams)
            _restore_fds(saved)
            sink.seek(0)
            parts = [sink.read().decode(errors="replace"), text.getvalue()]
            parts += [warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught]
            output = "".join(parts)
            if output:
                log.write(f"==> {what}\n{output}" + ("" if output.endswith("\n") else "\n"))


@contextlib.contextmanager
def quiet(what: str) -> Iterator[None]:
    """Run the block with its chatter redirected into the active ``chatter_to`` log; a no-op without one.

    Args:
        what: a heading for the block's output in the log (``"create_optimizer('adamw_bnb_8bit')"``).
    """
    log = _LOG.get()
    if log is None or _CAPTURING.get():  # none active, or inside an outer quiet block that captures it all
        yield
        return
    token = _CAPTURING.set(True)
    try:
        with _captured(log, what):
            yield
    finally:
        _CAPTURING.reset(token)
