"""Sentence classification tasks for ``effopt finetune``: one built offline from text the package ships, and
GLUE tasks through Hugging Face ``datasets`` for users who are online.

- ``shakespeare-order`` (offline, shipped): is this line of Tiny Shakespeare in its original word order (1) or
  are its words shuffled (0)? Lines of dialogue with at least ``MIN_WORDS`` words, lower-cased and stripped
  of punctuation, so that capitals and a final full stop give nothing away: only word order tells the
  classes apart, and a bag-of-words or bag-of-characters classifier is exactly at chance (50 %, balanced
  classes). Each line appears once, shuffled or not by a seeded coin. Training lines come from the first
  90 % of the text (the LM's training split), test lines from the last 10 % (held out from pretraining).
- ``sst2`` (GLUE SST-2, movie-review sentiment) and ``mrpc`` (GLUE MRPC, paraphrase pairs, the two
  sentences joined by `` | ``): ``datasets.load_dataset("glue", ...)``; their validation split serves as the
  test split (GLUE's test labels are hidden).

Examples are ``(text, label)`` pairs; ``encode`` turns them into padded token ids with the pretrained LM's
own tokenizer (bytes, or the BPE trained on its corpus).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import numpy as np
import torch

from .data import get_corpus, get_tokenizer, split_text

MIN_WORDS = 6
OFFLINE_TASKS = ("shakespeare-order",)
GLUE_TASKS = {"sst2": ("sentence", None), "mrpc": ("sentence1", "sentence2")}
TASKS = (*OFFLINE_TASKS, *GLUE_TASKS)
_SPEAKER = re.compile(r"^[A-Z][A-Za-z' ]*:$")
_WORD = re.compile(r"[a-z']+")


@dataclass
class ClassificationData:
    """A classification task's examples.

    Args:
        name: the task's name.
        train, test: ``(text, label)`` pairs.
        classes: number of classes.
        chance: accuracy of always answering the most frequent test class.
        description: one line for reports.
    """

    name: str
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]
    classes: int
    chance: float
    description: str


def _dialogue_lines(text: str) -> list[list[str]]:
    """Lower-cased words of each dialogue line with at least ``MIN_WORDS`` words (speaker names skipped)."""
    out = []
    for line in text.split("\n"):
        line = line.strip()
        if not line or _SPEAKER.match(line):
            continue
        words = _WORD.findall(line.lower())
        if len(words) >= MIN_WORDS:
            out.append(words)
    return out


def _order_examples(lines: list[list[str]], rng: random.Random, limit: int) -> list[tuple[str, int]]:
    rng.shuffle(lines)
    out = []
    for words in lines[:limit]:
        label = rng.random() < 0.5
        if not label:
            shuffled = words[:]
            while shuffled == words:  # a line of repeated words may need several draws; never the original order
                rng.shuffle(shuffled)
                if len(set(words)) == 1:
                    break
            if shuffled == words:
                continue
            words = shuffled
        out.append((" ".join(words), int(label)))
    return out


def shakespeare_order(train_examples: int = 4000, test_examples: int = 1000, seed: int = 0) -> ClassificationData:
    """The offline word-order task (see the module docstring).

    Args:
        train_examples: at most this many training examples (default 4000).
        test_examples: at most this many test examples (default 1000).
        seed: seeds which lines are used and which are shuffled (default 0: the same data for every run).
    """
    train_text, held_out = split_text(get_corpus("tinyshakespeare").text, 0.1)
    rng = random.Random(seed)
    train = _order_examples(_dialogue_lines(train_text), rng, train_examples)
    test = _order_examples(_dialogue_lines(held_out), rng, test_examples)
    return ClassificationData("shakespeare-order", train, test, 2, _chance(test),
                              "Tiny Shakespeare lines: original word order vs shuffled (lower-cased, no punctuation)")  # fmt: skip


def _chance(examples: list[tuple[str, int]]) -> float:
    if not examples:
        return 0.0
    counts = np.bincount([y for _, y in examples])
    return float(counts.max() / counts.sum())


def glue(task: str, train_examples: int = 4000, test_examples: int = 1000, seed: int = 0) -> ClassificationData:
    """GLUE ``sst2`` or ``mrpc`` through ``datasets`` (needs the package and, the first time, a network).

    Args:
        task: ``sst2`` or ``mrpc``.
        train_examples, test_examples: at most this many (a seeded sample of GLUE's train / validation split).
        seed: seeds the sample (default 0).
    """
    if task not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {task!r}; choose one of {sorted(GLUE_TASKS)}")
    try:
        import datasets
    except ImportError:
        raise RuntimeError(f"{task} needs Hugging Face datasets: pip install 'efficient_optim[data]' (and a network "
                           "connection the first time); offline, use --task shakespeare-order") from None  # fmt: skip
    try:
        ds = datasets.load_dataset("glue", task)
    except Exception as exc:  # offline, hub unreachable, no cached copy
        raise RuntimeError(f"could not load GLUE {task} ({type(exc).__name__}: {str(exc)[:200]}); it needs a network "
                           "connection the first time. Offline, use --task shakespeare-order") from None  # fmt: skip
    first, second = GLUE_TASKS[task]

    def pairs(split, limit):
        rows = ds[split]
        idx = list(range(len(rows)))
        random.Random(seed).shuffle(idx)
        out = []
        for i in idx[:limit]:
            row = rows[i]
            text = row[first] if second is None else f"{row[first]} | {row[second]}"
            out.append((text, int(row["label"])))
        return out

    test = pairs("validation", test_examples)
    return ClassificationData(task, pairs("train", train_examples), test, 2, _chance(test),
                              f"GLUE {task.upper()} (test: GLUE's validation split)")  # fmt: skip


def load_task(name: str, train_examples: int = 4000, test_examples: int = 1000, seed: int = 0) -> ClassificationData:
    """``shakespeare-order``, ``sst2`` or ``mrpc`` (arguments as ``shakespeare_order``)."""
    if name in OFFLINE_TASKS:
        return shakespeare_order(train_examples, test_examples, seed)
    if name in GLUE_TASKS:
        return glue(name, train_examples, test_examples, seed)
    raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")


def text_encoder(tokenizer: str, data: str, vocab_size: int):
    """``encode(text) -> list[int]`` with the tokenizer an LM was pretrained with (``bytes``, or the BPE the
    harness trained on corpus ``data`` with ``vocab_size`` symbols)."""
    if tokenizer == "bytes":
        return lambda text: list(text.encode("utf-8"))
    tok = get_tokenizer(get_corpus(data), vocab_size)
    return lambda text: tok.encode(text).ids


def encode(examples: list[tuple[str, int]], encoder, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids, mask, labels)``: token ids cut to ``length`` and right-padded with 0, the mask of real tokens."""
    ids = torch.zeros(len(examples), length, dtype=torch.long)
    mask = torch.zeros(len(examples), length, dtype=torch.long)
    for i, (text, _) in enumerate(examples):
        toks = encoder(text)[:length] or [0]
        ids[i, : len(toks)] = torch.tensor(toks)
        mask[i, : len(toks)] = 1
    return ids, mask, torch.tensor([y for _, y in examples], dtype=torch.long)
