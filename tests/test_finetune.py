"""``effopt finetune``: the offline word-order task, encoding, the classifier, one fine-tuning run, GLUE's
offline error, and a quick end-to-end run that reuses its pretrained LM and finished runs."""

import json
import random
import re

import pytest
import torch

from efficient_optim.bench import classification_data as cd
from efficient_optim.bench.finetune_run import FinetuneSettings, SequenceClassifier, finetune_once
from efficient_optim.bench.models import build_lm
from efficient_optim.cli import main


def test_word_order_examples_are_permutations_of_real_lines_with_no_surface_cue():
    lines = [["to", "be", "or", "not", "to", "be", "that", "is"], ["a", "b", "c", "d", "e", "f"]] * 20
    ex = cd._order_examples([list(x) for x in lines], random.Random(0), 40)
    assert {y for _, y in ex} == {0, 1}
    originals = {" ".join(x) for x in lines}
    for text, label in ex:
        assert (text in originals) == bool(label)  # a shuffled line is never its original order
        assert sorted(text.split()) in [sorted(x) for x in lines]  # same words: a bag of words cannot tell
    data = cd.shakespeare_order(train_examples=300, test_examples=100, seed=0)
    assert len(data.train) == 300 and len(data.test) == 100 and 0.5 <= data.chance < 0.65
    assert all(re.fullmatch(r"[a-z' ]+", t) and len(t.split()) >= cd.MIN_WORDS for t, _ in data.train + data.test)
    assert cd.shakespeare_order(train_examples=300, test_examples=100, seed=0).train == data.train  # deterministic
    train_text, held_out = cd.split_text(cd.get_corpus("tinyshakespeare").text, 0.1)
    held_lines = {" ".join(w) for w in cd._dialogue_lines(held_out)}
    assert all(t in held_lines for t, y in data.test if y == 1)  # test lines come from the held-out text


def test_encode_truncates_pads_and_masks():
    ids, mask, labels = cd.encode([("abc", 1), ("abcdefgh", 0)], cd.text_encoder("bytes", "tinyshakespeare", 0), 5)
    assert ids.tolist() == [[97, 98, 99, 0, 0], [97, 98, 99, 100, 101]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]] and labels.tolist() == [1, 0]


def test_classifier_pools_over_real_tokens_only():
    lm = build_lm("gpt2-tiny", 256, 0, layers=1, width=32, heads=2)
    model = SequenceClassifier(lm, 2, seed=0).eval()
    ids = torch.tensor([[5, 6, 7, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    with torch.no_grad():
        a = model(ids, mask)
        b = model(torch.tensor([[5, 6, 7, 9, 9]]), mask)  # other padding ids: same logits
    assert a.shape == (1, 2) and torch.allclose(a, b, atol=1e-6)


def test_one_run_is_deterministic_and_learns_a_separable_toy_task():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (64,), generator=gen)
    ids = torch.where(labels.unsqueeze(1).bool(), 200, 100).repeat(1, 8)  # the class is the token itself
    mask = torch.ones_like(ids)
    s = FinetuneSettings(steps=30, batch_size=16, lr=3e-3, warmup=3)

    def run():
        lm = build_lm("gpt2-tiny", 256, 0, layers=1, width=32, heads=2)
        return finetune_once(lm, "adamw", (ids, mask, labels), (ids, mask, labels), 2, seed=1, s=s)

    r1, r2 = run(), run()
    assert r1["test_accuracy"] == 1.0 and r1["diverged_at"] is None and r1["state_bytes"] > 0
    assert r1["train_loss"] == r2["train_loss"] and r1["test_loss"] == r2["test_loss"]


def test_glue_without_datasets_is_a_clear_error(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets here")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(RuntimeError, match="pip install 'efficient_optim\\[data\\]'.*shakespeare-order"):
        cd.load_task("sst2")
    with pytest.raises(ValueError, match="unknown task"):
        cd.load_task("cola")


def test_quick_command_end_to_end_reuses_the_pretrained_lm_and_finished_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EFFOPT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "ft"
    assert main(["finetune", "--quick", "--out", str(out)]) == 0
    data = json.loads((out / "finetune.json").read_text())
    assert [r["optimizer"] for r in data["runs"]] == ["adamw", "qadamw4", "adamw (from scratch)"]
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in data["runs"])
    assert data["task"]["name"] == "shakespeare-order" and data["pretrain"]["config"]["steps"] == 20
    report = (out / "report.md").read_text()
    assert "Pretraining is worth" in report and (out / "finetune.png").is_file()
    capsys.readouterr()
    assert main(["finetune", "--quick", "--out", str(out)]) == 0  # everything reused: nothing trains again
    printed = capsys.readouterr().out
    assert "test accuracy" not in printed and json.loads((out / "finetune.json").read_text())["runs"] == data["runs"]
    assert main(["finetune", "--quick", "--steps", "7", "--out", str(out)]) == 2  # other settings, same folder
    assert "other settings" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--optimizers", "nosuch"], "unknown optimizer"),
    (["--model", "digits-cnn"], "LM preset"),
    (["--seeds", "0"], "--seeds"),
])  # fmt: skip
def test_bad_input_is_a_clear_error(argv, message, tmp_path, capsys):
    assert main(["finetune", "--quick", "--out", str(tmp_path / "x"), *argv]) == 2
    assert message in capsys.readouterr().err
