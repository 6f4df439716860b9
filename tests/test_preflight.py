"""Bad input to the training commands fails before the first run: exit code 2, one ``error:`` line, no
traceback, no header, and no output folder or report left behind."""

import gzip
import json

import pytest
import torch

from efficient_optim.bench import preflight as pf
from efficient_optim.bench.config import RunConfig
from efficient_optim.bench.options import UsageError
from efficient_optim.cli import main

SMALL_MODEL = ["--layers", "1", "--width", "32", "--heads", "2", "--ctx", "32", "--batch", "2", "--steps", "2"]


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFOPT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("to be or not to be, that is the question. " * 100)
    return path


def refused(argv, message, capsys, out):
    """Run ``effopt ARGV``; assert exit code 2, ``message`` on stderr, no traceback, nothing created."""
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 2, captured
    assert message in captured.err
    assert captured.err.startswith("error: ") and "Traceback" not in captured.err + captured.out
    assert "runs" not in captured.out  # no header line was printed
    assert not out.exists()
    return captured.err


def bench(corpus, out, *extra):
    return ["bench", "--data", str(corpus), "--optimizers", "adamw", *SMALL_MODEL, "--out", str(out), *extra]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--model", "gpt2-huge"], "unknown model preset 'gpt2-huge'"),
        (["--optimizers", "adamw,qadamw8+bits=3"], "optimizer 'qadamw8+bits=3': invalid bits: 3"),
        (["--optimizers", "qadamw8+rnak=2"], "optimizer 'qadamw8+rnak=2'"),
        (["--ctx", "500"], "context 500 is longer than the model's"),
        (["--grad-release", "--clip", "0"], "optimizer 'adamw'"),  # torch's AdamW cannot step per parameter
        (["--optimizers", ","], "--optimizers names no optimizer"),
    ],
)
def test_bench_refuses_bad_plans_before_the_first_run(extra, message, corpus, tmp_path, capsys):
    refused(bench(corpus, tmp_path / "out", *extra), message, capsys, tmp_path / "out")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_refused(corpus, tmp_path, capsys):
    refused(bench(corpus, tmp_path / "out", "--device", "cuda"), "no CUDA device is available", capsys, tmp_path / "out")


def test_corpus_shorter_than_one_sequence_fails_once(tmp_path, capsys):
    small = tmp_path / "small.txt"
    small.write_text("tiny")
    err = refused(bench(small, tmp_path / "out", "--optimizers", "adamw,qadamw8,lion"),
                  "fewer than one sequence of 33", capsys, tmp_path / "out")  # fmt: skip
    assert err.count("error") == 1


def test_binary_and_non_utf8_data_are_refused_naming_the_file(tmp_path, capsys):
    lib = tmp_path / "lib.so"
    lib.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 50)
    refused(bench(lib, tmp_path / "out"), f"data file {lib} is not text: it holds NUL bytes", capsys, tmp_path / "out")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\u00e9 ".encode("latin-1") * 500)
    refused(bench(latin, tmp_path / "out"), "is not UTF-8 text: byte 0xe9 at offset 3", capsys, tmp_path / "out")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text("fine text " * 200)
    (folder / "b.py").write_bytes(b"\x00\x01binary")
    refused(bench(folder, tmp_path / "out"), f"data file {folder / 'b.py'} is not text", capsys, tmp_path / "out")
    tgz = tmp_path / "archive.tar.gz"
    tgz.write_bytes(gzip.compress(b"x" * 100 + b"\x00" * 512))
    refused(bench(tgz, tmp_path / "out"), "(after gzip decompression) is not text", capsys, tmp_path / "out")


def test_unwritable_out_is_refused(corpus, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    refused(bench(corpus, blocker / "sub"), f"--out {blocker / 'sub'} cannot be created: {blocker} is a file",
            capsys, blocker / "sub")  # fmt: skip
    err = refused(bench(corpus, blocker), "is a file, not a folder", capsys, tmp_path / "never")
    assert blocker.read_text() == "x"
    assert "a_file" in err


def test_reused_out_without_resume_is_refused_before_the_header(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "plan.json").write_text('{"runs": []}')
    assert main(bench(corpus, out)) == 2
    captured = capsys.readouterr()
    assert "already holds runs: pass --resume" in captured.err and captured.out == ""
    assert sorted(p.name for p in out.iterdir()) == ["plan.json"]


def test_resume_with_other_settings_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    before = RunConfig(optimizer="adamw", steps=5, layers=1, width=32, heads=2, context=32)
    (out / "plan.json").write_text(json.dumps({"runs": [before.to_dict()]}))
    after = RunConfig(optimizer="adamw", steps=2, layers=1, width=32, heads=2, context=32)
    with pytest.raises(UsageError, match=r"planned with other settings \(steps: 5 -> 2\)"):
        pf.check_resume([after], out)
    pf.check_resume([before], out)  # same settings: resumable


def test_missing_log_backend_is_refused(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(pf.LOG_PACKAGES, "tensorboard", "no_such_package_for_effopt_tests")
    refused(bench(corpus, tmp_path / "out", "--log", "tensorboard"), "needs the no_such_package_for_effopt_tests package",
            capsys, tmp_path / "out")  # fmt: skip


def test_suite_characterize_and_decompose_check_before_running(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    refused(["suite", "p1", "--quick", "--data", str(corpus), "--model", "nope", "--out", str(out)],
            "unknown model preset 'nope'", capsys, out)  # fmt: skip
    refused(["suite", "p1", "--quick", "--data", str(tmp_path / "small.txt"), "--out", str(out)],
            "data path not found", capsys, out)  # fmt: skip
    refused(["characterize", "--quick", "--data", str(corpus), "--model", "nope", "--out", str(out)],
            "unknown model preset 'nope'", capsys, out)  # fmt: skip
    refused(["decompose", "--data", str(corpus), "--model", "nope", "--out", str(out)], "unknown model preset", capsys, out)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    refused(["decompose", "--data", str(corpus), "--out", str(blocker / "x")], "is a file, not a folder", capsys, blocker / "x")


def test_failed_runs_write_no_empty_report(corpus, tmp_path, capsys, monkeypatch):
    import efficient_optim.bench.runner as runner

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure inside a run")

    monkeypatch.setattr(runner, "train_run", broken)
    assert main(bench(corpus, tmp_path / "out", "--no-progress")) == 1
    assert "no run finished (1 failed" in capsys.readouterr().err
    assert not (tmp_path / "out" / "report.md").exists()


def test_preflight_accepts_a_valid_plan_without_creating_anything(corpus, tmp_path):
    cfg = RunConfig(optimizer="qadamw4+m_map=softsign", data=str(corpus), layers=1, width=32, heads=2, context=32)
    pf.preflight([cfg, RunConfig(**{**cfg.to_dict(), "optimizer": "lowrank_adam+rank=4"})], tmp_path / "new" / "out")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("argv", [["bench", "--help"], ["suite", "p1", "--help"], ["characterize", "--help"],
                                  ["decompose", "--help"]])  # fmt: skip
def test_help_never_cuts_a_word(argv, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for word in ("wikitext-103", "(default"):
        assert word in text
    if argv[0] == "bench":
        assert "adamw_bnb_8bit" in text and "hybrid_adam," in text
    if argv[0] == "suite":
        assert "--grad-accum" in text  # the run options are listed with the suite's help
