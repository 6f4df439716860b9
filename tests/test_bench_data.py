"""Benchmark data pipeline: corpora, deterministic split, cached tokenizer and token arrays, clear errors."""

import builtins
import re
import sys
from contextlib import nullcontext

import numpy as np
import pytest

from efficient_optim.bench import data


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFOPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_embedded_corpus_is_deterministic_and_fingerprinted():
    a, b = data.embedded_corpus(200_000), data.embedded_corpus(200_000)
    assert a.text == b.text and len(a.text) == 200_000
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 16
    assert "def " in a.text


def test_local_file_and_folder(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.txt").write_text("second")
    (tmp_path / "d" / "a.txt").write_text("first")
    (tmp_path / "d" / "skip.bin").write_bytes(b"\x00\x01")
    assert data.local_corpus(tmp_path / "d").text == "first\nsecond"
    assert data.local_corpus(tmp_path / "d" / "b.txt").text == "second"
    with pytest.raises(FileNotFoundError, match="data path not found"):
        data.get_corpus(tmp_path / "missing.txt")


def test_split_is_by_position_and_rejects_bad_fractions():
    train, val = data.split_text("abcdefghij", 0.2)
    assert (train, val) == ("abcdefgh", "ij")
    with pytest.raises(ValueError, match="val_fraction"):
        data.split_text("abc", 1.5)


def test_wikitext_without_datasets_says_what_to_do(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "datasets", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(RuntimeError, match="pip install"):
        data.get_corpus("wikitext-2")


def test_byte_tokens_are_cached_and_memory_mapped(tmp_cache):
    corpus = data.Corpus("t", "hello world " * 100)
    first = data.token_data(corpus, "bytes")
    assert isinstance(first.train, np.memmap) and first.vocab_size == 256
    assert bytes(first.train[:5].astype(np.uint8)) == b"hello"
    assert len(first.train) + len(first.val) == len(corpus.text)
    second = data.token_data(corpus, "bytes")
    assert np.array_equal(first.val, second.val)


def test_bpe_tokenizer_is_trained_once_then_loaded(tmp_cache):
    corpus = data.Corpus("t", "the quick brown fox jumps over the lazy dog. " * 300)
    tok = data.get_tokenizer(corpus, 300)
    saved = list((tmp_cache / "tokenizers").glob("*.json"))
    assert len(saved) == 1
    mtime = saved[0].stat().st_mtime_ns
    again = data.get_tokenizer(corpus, 300)
    assert saved[0].stat().st_mtime_ns == mtime
    text = "the lazy fox"
    assert tok.encode(text).ids == again.encode(text).ids
    assert again.decode(again.encode(text).ids) == text
    assert len(tok.encode(text).ids) < len(text)  # merges were learned
    td = data.token_data(corpus, "bpe", vocab_size=300)
    assert td.vocab_size == 300 and int(td.train.max()) < 300
    with pytest.raises(ValueError, match="vocab_size"):
        data.get_tokenizer(corpus, 100)


def test_gzipped_text_is_read_as_its_text(tmp_path):
    import gzip

    plain = tmp_path / "corpus.txt"
    plain.write_bytes(b"line one\r\nline two\n\xc3\xa9t\xc3\xa9\n")
    packed = tmp_path / "corpus.txt.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert data.local_corpus(packed).text == data.local_corpus(plain).text == "line one\nline two\n\u00e9t\u00e9\n"
    assert data.local_corpus(packed).fingerprint == data.local_corpus(plain).fingerprint


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("lib.so", b"\x7fELF\x02\x01\x01\x00\x00\x00", "is not text: it holds NUL bytes (first at byte 7)"),
        ("notes.txt", "na\u00efve".encode("latin-1"), "is not UTF-8 text: byte 0xef at offset 2"),
        ("broken.gz", b"\x1f\x8b\x08\x00garbage", "starts like gzip but does not decompress"),
    ],
)
def test_non_text_files_are_refused_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"data file {path}.*{re.escape(message)}"):
        data.get_corpus(path)


def test_a_folder_is_refused_when_a_file_it_reads_is_binary(tmp_path):
    (tmp_path / "a.txt").write_text("text")
    (tmp_path / "b.md").write_bytes(b"PK\x03\x04\x00\x00")
    with pytest.raises(ValueError, match=re.escape(f"data file {tmp_path / 'b.md'} is not text")):
        data.local_corpus(tmp_path)


def test_the_test_split_is_carved_from_the_held_out_tail_and_leaves_training_alone(tmp_cache):
    corpus = data.Corpus("t", "".join(f"line {i}: some text\n" for i in range(500)))
    before = data.token_data(corpus, "bytes")  # no test split: the whole held-out 10 % is validation
    split = data.token_data(corpus, "bytes", test_fraction=0.05)
    assert np.array_equal(split.train, before.train)  # training data (and batches) are the same
    assert np.array_equal(np.concatenate([split.val, split.test]), before.val)
    assert len(split.val) == round(len(before.val) / 2) and before.test is None
    assert bytes(split.test[-6:].astype(np.uint8)) == corpus.text[-6:].encode()  # the test text is the corpus' end
    assert data.split_held_out("abcdefghij", 0.1, 0.03) == ("abcdefg", "hij")
    with pytest.raises(ValueError, match="test_fraction"):
        data.split_held_out("abc", 0.1, 0.1)


def test_tasks_evaluate_the_test_split_apart_from_validation(corpus):
    import torch

    from efficient_optim.bench.config import RunConfig
    from efficient_optim.bench.tasks import build_task

    cfg = RunConfig(data=str(corpus), layers=1, width=32, heads=2, context=16, batch_size=4, eval_batches=2, device="cpu")
    task = build_task(cfg, torch.device("cpu"))
    model = task.build_model()
    val, test = task.evaluate(model, nullcontext), task.evaluate(model, nullcontext, split="test")
    assert set(val) == {"val_loss", "val_ppl"} and set(test) == {"test_loss", "test_ppl"}
    assert val["val_loss"] != test["test_loss"] and test["test_ppl"] == pytest.approx(np.exp(test["test_loss"]))
    none = build_task(RunConfig(**{**cfg.to_dict(), "test_fraction": 0.0}), torch.device("cpu"))
    assert not none.has_test and len(none.val) == len(task.val) + len(task.test)
    with pytest.raises(ValueError, match="no test split"):
        none.evaluate(model, nullcontext, split="test")
    with pytest.raises(ValueError, match="test_fraction must be in"):
        RunConfig(test_fraction=0.2).validate()
