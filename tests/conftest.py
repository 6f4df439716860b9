"""Fixtures shared by the harness tests."""

import pytest


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """A small text corpus file (600 lines) with the corpus cache in a temporary folder."""
    monkeypatch.setenv("EFFOPT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}.\n" for i in range(600)))
    return path
