"""Every command quoted in README.md, BENCHMARKS.md and docs/*.md runs from a fresh clone, as far as it can
without doing the work.

The ``effopt ...`` and ``python benchmarks/...`` command lines are taken from fenced code blocks and inline
code spans. Each goes through the real entry point with its real argparse parser:

- ``effopt bench``, ``suite``, ``characterize`` and ``decompose`` run every check they make before their
  first training step (options, optimizer specs, data, model, output folder) and are stopped right where the
  work would start (``STOP_BEFORE``); an unknown flag, a bad value or a refused plan fails the test;
- the others (``effopt report``, the ``benchmarks/`` scripts, and the ``PARSE_ONLY`` exceptions, each with
  its reason) are stopped right after their parser accepted the arguments;
- a bare ``effopt NAME`` in prose names a command: it must exist. Placeholders (``DIR``, ``SPEC``, ...) are
  replaced by real values (``PLACEHOLDERS``).

Commands run in a temporary working directory, so nothing is left in the clone.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from efficient_optim import cli

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
CORPUS_FILE = ROOT / "efficient_optim" / "bench" / "corpora" / "tinyshakespeare.txt"

# Placeholders the docs use in prose, and the value each is checked with.
PLACEHOLDERS = {
    "NAME": "p1",
    "SPEC": "hybrid_adam",
    "DIR": "runs/bench/x",
    "PATH": str(CORPUS_FILE),
    "my_corpus.txt": str(CORPUS_FILE),
}

# Where each effopt command's work starts: (module, function) replaced by a stop.
STOP_BEFORE = {
    "bench": ("efficient_optim.bench.quick", "run_matrix"),
    "suite": ("efficient_optim.bench.suites", "run_matrix"),
    "characterize": ("efficient_optim.bench.characterize", "run_study"),
    "decompose": ("efficient_optim.analysis.decomposition", "decompose_errors"),
    "finetune": ("efficient_optim.bench.finetune", "run_finetune"),
    "landscape": ("efficient_optim.bench.landscape_cmd", "run_landscape"),
    "theory": ("efficient_optim.bench.theory_cmd", "run_studies"),
    "mango": ("efficient_optim.compress.train_policy", "train"),
}

# Commands checked at the parser only, with the reason.
PARSE_ONLY = {
    "effopt bench --model llama-60m --tokenizer bpe --vocab-size 8192 --data wikitext-2 --device cuda --steps 5000":
        "needs a CUDA GPU and a network connection (wikitext-2)",
    "effopt bench --out runs/mine --resume": "continues a folder of earlier runs",
    "effopt characterize --out runs/characterize --report-only": "rebuilds the report of an earlier study",
}  # fmt: skip
COMMANDS_PARSE_ONLY = {"report": "needs the folder of an earlier run"}

NAMED = "<named in prose>"
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`]+)`")
LOOKS_LIKE_COMMAND = re.compile(r"\s*(?:[A-Za-z_]\w*=\S*\s+)*(?:time\s+)?(?:effopt\s|python3?\s+benchmarks/)")


class _Stop(Exception):
    """Raised where a command's work would start."""


def _command_start(tokens: list[str]) -> list[str] | None:
    """The command without leading ``VAR=value`` assignments and ``time``; ``None`` if it is not one of ours."""
    while tokens and (re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", tokens[0]) or tokens[0] == "time"):
        tokens = tokens[1:]
    if tokens[:1] == ["effopt"] and len(tokens) > 1:
        return tokens
    if tokens[:1] in (["python"], ["python3"]) and len(tokens) > 1 and tokens[1].startswith("benchmarks/"):
        return tokens
    return None


def _commands_in(text: str) -> list[tuple[int, list[str], str]]:
    """``(line, argv, "block" | "inline")`` of every effopt / benchmarks command in fenced blocks and inline
    code of ``text``."""
    found = []
    for block in FENCE.finditer(text):
        first = text.count("\n", 0, block.start(1)) + 1
        logical, start = "", first
        for i, line in enumerate(block.group(1).split("\n")):
            if not logical:
                start = first + i
            if line.rstrip().endswith("\\"):
                logical += line.rstrip()[:-1] + " "
                continue
            logical += line
            for part in logical.split("&&"):
                if not LOOKS_LIKE_COMMAND.match(part):  # python code, other shell commands
                    continue
                tokens = _command_start(shlex.split(part, comments=True))
                if tokens:
                    found.append((start, tokens, "block"))
            logical = ""
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for span in INLINE.finditer(prose):
        if not LOOKS_LIKE_COMMAND.match(span.group(1)):
            continue
        tokens = _command_start(shlex.split(" ".join(span.group(1).split())))
        if tokens and "/" not in tokens:  # not a list of subcommands in prose ("effopt bench / suite")
            found.append((prose.count("\n", 0, span.start()) + 1, tokens, "inline"))
    return found


def _all_commands() -> list[tuple[str, list[str]]]:
    """``("FILE:LINE", argv)`` of each distinct command, where it is first quoted. In prose, a bare
    ``effopt NAME`` names a command rather than running it: ``argv`` is then ``["effopt", "NAME", NAMED]``."""
    out, seen = [], set()
    for f in DOC_FILES:
        for line, tokens, kind in _commands_in(f.read_text(encoding="utf-8")):
            if kind == "inline" and tokens[0] == "effopt" and len(tokens) == 2:
                tokens = [*tokens, NAMED]
            if shlex.join(tokens) not in seen:
                seen.add(shlex.join(tokens))
                out.append((f"{f.relative_to(ROOT)}:{line}", tokens))
    return out


COMMANDS = _all_commands()


def _stop_after_parse(monkeypatch) -> None:
    """The next ``parse_args`` that succeeds raises ``_Stop`` instead of returning."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Stop("parsed")

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)


def _run_benchmark_script(argv: list[str], monkeypatch) -> None:
    """Load ``benchmarks/<script>.py`` and parse ``argv`` with its parser."""
    path = ROOT / argv[1]
    assert path.is_file(), f"{argv[1]} does not exist"
    spec = importlib.util.spec_from_file_location(f"_doc_cmd_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _stop_after_parse(monkeypatch)
    with pytest.raises(_Stop):
        module.main(argv[2:])


def _run_effopt(argv: list[str], mode: str, monkeypatch, capsys) -> None:
    """Run ``effopt`` with ``argv``: to its stop, to the end of parsing, or (``list``) completely."""
    if mode == "parse":
        _stop_after_parse(monkeypatch)
    elif argv[0] in STOP_BEFORE:
        module, name = STOP_BEFORE[argv[0]]

        def stop(*args, **kwargs):
            raise _Stop(name)

        monkeypatch.setattr(importlib.import_module(module), name, stop)
    try:
        rc = cli.main(argv)
    except _Stop:
        return
    except SystemExit as exc:  # argparse: 0 after --help, 2 for an unknown flag or a bad value
        assert exc.code == 0, f"the parser refused it: {capsys.readouterr().err.strip()}"
        return
    assert rc == 0, f"exit code {rc}: {capsys.readouterr().err.strip()}"


@pytest.fixture
def fresh_dir(tmp_path, monkeypatch, tmp_path_factory):
    """An empty working directory and a private cache, so the commands leave nothing behind."""
    cache = tmp_path_factory.getbasetemp() / "effopt-cache"
    monkeypatch.setenv("EFFOPT_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_quoted_command_runs_up_to_its_work(where, argv, fresh_dir, monkeypatch, capsys):
    argv = [PLACEHOLDERS.get(a, a) for a in argv]
    if argv[-1] == NAMED:
        assert argv[1] in cli.COMMANDS, f"effopt has no command {argv[1]!r}"
        return
    if argv[0] != "effopt":
        _run_benchmark_script(argv, monkeypatch)
        return
    text = shlex.join(argv)
    parse_only = text in PARSE_ONLY or argv[1] in COMMANDS_PARSE_ONLY
    _run_effopt(argv[1:], "parse" if parse_only else "full", monkeypatch, capsys)


def test_commands_are_found_in_every_document_that_quotes_them():
    sources = {w.split(":")[0] for w, _ in COMMANDS}
    for name in (
        "README.md",
        "BENCHMARKS.md",
        "docs/bench.md",
        "docs/characterization.md",
        "docs/protocols.md",
    ):
        assert name in sources, f"no command extracted from {name}"
    assert len(COMMANDS) >= 40
    # a continued line is one command; a chained install line yields its effopt part only
    multi = [a for w, a in COMMANDS if "--eval-batches" in a]
    assert multi and all(a[:2] == ["effopt", "bench"] for a in multi)
    assert ["effopt", "bench"] in [a for w, a in COMMANDS if w.startswith("README.md")]


def test_parse_only_exceptions_are_still_quoted():
    quoted = {shlex.join(a) for _, a in COMMANDS}
    assert set(PARSE_ONLY) <= quoted, set(PARSE_ONLY) - quoted


def test_a_bad_flag_or_value_fails_the_check(fresh_dir, monkeypatch, capsys):
    for argv in (
        ["bench", "--no-such-flag"],
        ["bench", "--steps", "ten"],
        ["bench", "--optimizers", "nosuch"],
        ["bench", "--data", "no/such/file.txt"],
        ["suite", "p1", "--data", "no/such/file.txt"],
    ):
        with monkeypatch.context() as mp, pytest.raises(AssertionError):
            _run_effopt(argv, "full", mp, capsys)


def test_docs_do_not_point_outside_the_repository():
    for f in DOC_FILES:
        assert "../shared" not in f.read_text(encoding="utf-8"), f"{f.relative_to(ROOT)} points at ../shared"


def test_tinyshakespeare_is_shipped_as_package_data():
    from efficient_optim.bench.data import get_corpus

    corpus = get_corpus("tinyshakespeare")
    assert corpus.text.startswith("First Citizen:") and len(corpus.text) == 1_115_394
    assert corpus.fingerprint == "86c4e6aa9db7c042"  # the text the recorded benchmarks ran on
    package_data = (
        (ROOT / "pyproject.toml").read_text().split("[tool.setuptools.package-data]")[1].split("\n[")[0]
    )
    assert '"bench/corpora/*.txt"' in package_data
