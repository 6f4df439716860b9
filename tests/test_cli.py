"""The effopt command line: listing, the quick bench end to end on a tiny model, clear errors."""

import json

import pytest

from efficient_optim.cli import main


def test_list_names_every_registered_optimizer(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "qadamw8" in out and "adamw_torchao_4bit" in out


def test_bench_runs_end_to_end_and_writes_a_summary(tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("to be or not to be, that is the question. " * 400)
    rc = main(["bench", "--data", str(text), "--optimizers", "adamw,qadamw8", "--steps", "6", "--layers", "1",
               "--width", "32", "--ctx", "32", "--batch", "4", "--out", str(tmp_path / "run")])  # fmt: skip
    assert rc == 0
    runs = json.loads((tmp_path / "run" / "summary.json").read_text())["runs"]
    assert [r["optimizer"] for r in runs] == ["adamw", "qadamw8"]
    assert all(r["final_val_loss"] > 0 and r["state_bytes"] > 0 for r in runs)
    assert runs[1]["state_bytes"] < runs[0]["state_bytes"]
    assert "vs AdamW" in capsys.readouterr().out
    assert (tmp_path / "run" / "report.md").is_file()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["bench", "--optimizers", "adamw9"], "unknown optimizer 'adamw9'"),
        (["bench", "--data", "/no/such/file.txt"], "data path not found"),
        (["frobnicate"], "unknown command"),
    ],
)
def test_cli_errors_are_clear(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
