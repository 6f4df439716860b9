"""Corpora and tokenization for the benchmarks: text in, cached memory-mapped token arrays out.

Corpora:
- ``embedded``: the running interpreter's own standard-library sources (a deterministic, sorted file
  list, capped in size, with a recorded sha256 fingerprint): no download on any machine.
- a local UTF-8 text file, gzip'd or not, or folder (``--data PATH``; folders: every ``.txt``/``.md``/``.py``
  file, sorted); binary or non-UTF-8 input is refused with the file's name.
- ``wikitext-2`` / ``wikitext-103`` through Hugging Face ``datasets`` for users who are online.
- corpora shipped with the package, by name (``SHIPPED_CORPORA``: ``tinyshakespeare``, the public-domain
  Tiny Shakespeare text, 1.1 MB).

Tokenizers: ``bytes`` (vocabulary 256) or a byte-level BPE trained with Hugging Face ``tokenizers`` on the
training split, cached on disk under the corpus fingerprint and vocabulary size. Token arrays are cached
as ``.npy`` files and memory-mapped. The splits are by position, so they are deterministic: the first 90 %
of the text trains, the held-out last 10 % is validation, and with a ``test_fraction`` (the harness's
default: 5 %) the last ``test_fraction`` of the text is a *test* split, carved from the held-out part (the
training text, and so the tokenizer and every training batch, are the same with or without it).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TEXT_SUFFIXES = (".txt", ".md", ".py")
WIKITEXT = {"wikitext-2": "wikitext-2-raw-v1", "wikitext-103": "wikitext-103-raw-v1"}
# Corpora shipped in efficient_optim/bench/corpora/ (package data), selectable by name: --data tinyshakespeare
SHIPPED_CORPORA = {"tinyshakespeare": "tinyshakespeare.txt"}
GZIP_MAGIC = b"\x1f\x8b"


def cache_dir() -> Path:
    """Where tokenizers and token arrays are cached: ``$EFFOPT_CACHE`` or ``~/.cache/efficient_optim``."""
    return Path(os.environ.get("EFFOPT_CACHE", Path.home() / ".cache" / "efficient_optim"))


@dataclass(frozen=True)
class Corpus:
    """Text with a name and a fingerprint (sha256 of the text) that keys every cache built from it."""

    name: str
    text: str

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()[:16]


def embedded_corpus(limit_bytes: int = 4_000_000) -> Corpus:
    """The Python standard library's own top-level ``.py`` sources, sorted by name, first ``limit_bytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for f in sorted(root.glob("*.py")):
        t = f.read_text(encoding="utf-8", errors="replace")
        parts.append(t)
        size += len(t)
        if size >= limit_bytes:
            break
    return Corpus("embedded-stdlib", "".join(parts)[:limit_bytes])


def read_text_file(path: str | Path) -> str:
    """The UTF-8 text of ``path``, decompressed first when it is gzip'd; newlines normalized to ``\\n``.

    ``ValueError`` naming the file when it is not text: NUL bytes (a binary file: a ``.so``, an archive)
    or bytes that are not UTF-8 (convert the file, e.g. ``iconv -t utf-8``).
    """
    path = Path(path)
    raw = path.read_bytes()
    what = f"data file {path}"
    if raw[:2] == GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise ValueError(f"{what} starts like gzip but does not decompress ({exc})") from None
        what += " (after gzip decompression)"
    if b"\x00" in raw:
        raise ValueError(f"{what} is not text: it holds NUL bytes (first at byte {raw.index(0)}); "
                         "--data needs UTF-8 text")  # fmt: skip
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} is not UTF-8 text: byte 0x{raw[exc.start]:02x} at offset {exc.start} does not "
                         "decode; convert it to UTF-8 (e.g. iconv -t utf-8) or pass another file") from None  # fmt: skip
    return text.replace("\r\n", "\n").replace("\r", "\n")  # what read_text's universal newlines gave


def local_corpus(path: str | Path) -> Corpus:
    """A text file (plain or gzip'd), or every ``TEXT_SUFFIXES`` file under a folder (sorted).

    ``FileNotFoundError`` naming the path when it is missing or a folder holds no text file; ``ValueError``
    naming the file when a file it would read is not UTF-8 text (``read_text_file``).
    """
    p = Path(path)
    if p.is_file():
        return Corpus(p.name, read_text_file(p))
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"no text files ({', '.join(TEXT_SUFFIXES)}) under {p}")
        return Corpus(p.name, "\n".join(read_text_file(f) for f in files))
    raise FileNotFoundError(f"data path not found: {p}")


def wikitext_corpus(name: str) -> Corpus:
    """``wikitext-2`` or ``wikitext-103`` (train + validation text) through Hugging Face ``datasets``."""
    if name not in WIKITEXT:
        raise ValueError(f"unknown corpus {name!r}; choose one of {sorted(WIKITEXT)}")
    try:
        import datasets
    except ImportError:
        raise RuntimeError(
            f"{name} needs Hugging Face datasets: pip install 'efficient_optim[data]' (and a network connection), "
            "or pass a local text file with --data PATH"
        ) from None
    try:
        ds = datasets.load_dataset("wikitext", WIKITEXT[name])
    except Exception as exc:  # offline, hub unreachable, no cached copy
        raise RuntimeError(
            f"could not load {name} ({type(exc).__name__}: {str(exc)[:200]}); it needs a network connection "
            "the first time (then it is cached by datasets). Offline, use the embedded corpus or --data PATH"
        ) from None
    return Corpus(name, "".join(ds["train"]["text"]) + "".join(ds["validation"]["text"]))


def shipped_corpus(name: str) -> Corpus:
    """A corpus shipped with the package (``SHIPPED_CORPORA``), e.g. ``tinyshakespeare``."""
    if name not in SHIPPED_CORPORA:
        raise ValueError(f"unknown shipped corpus {name!r}; choose one of {sorted(SHIPPED_CORPORA)}")
    path = Path(__file__).with_name("corpora") / SHIPPED_CORPORA[name]
    return Corpus(name, path.read_text(encoding="utf-8"))


def get_corpus(spec: str | Path | None) -> Corpus:
    """``None``/``"embedded"`` -> embedded corpus; ``wikitext-2``/``wikitext-103``; a shipped corpus by name
    (``tinyshakespeare``); anything else a path."""
    if spec is None or str(spec) == "embedded":
        return embedded_corpus()
    if str(spec) in SHIPPED_CORPORA:
        return shipped_corpus(str(spec))
    if str(spec) in WIKITEXT:
        return wikitext_corpus(str(spec))
    return local_corpus(spec)


def split_text(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """Deterministic split by position: the last ``val_fraction`` of the text is validation."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    cut = int(len(text) * (1 - val_fraction))
    return text[:cut], text[cut:]


def split_held_out(held_out: str, held_out_fraction: float, test_fraction: float) -> tuple[str, str]:
    """Validation and test text from the held-out tail: the last ``test_fraction`` of the corpus is test.

    Args:
        held_out: the held-out tail (the last ``held_out_fraction`` of the corpus: ``split_text``'s second part).
        held_out_fraction: the fraction of the corpus ``held_out`` is (e.g. 0.1).
        test_fraction: the fraction of the corpus to hold out as test, ``0 <= test_fraction < held_out_fraction``
            (0: no test text).
    """
    if not 0 <= test_fraction < held_out_fraction:
        raise ValueError(f"test_fraction must be in [0, {held_out_fraction}), got {test_fraction}")
    cut = round(len(held_out) * (1 - test_fraction / held_out_fraction))
    return held_out[:cut], held_out[cut:]


def get_tokenizer(corpus: Corpus, vocab_size: int, val_fraction: float = 0.1):
    """A byte-level BPE tokenizer trained on the corpus' training split, cached on disk.

    Returns a ``tokenizers.Tokenizer``. The cache key is the corpus fingerprint and ``vocab_size``; a second
    call loads the saved file instead of training.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ValueError(f"a BPE vocabulary needs more than the 256 byte symbols, got vocab_size={vocab_size}")
    path = cache_dir() / "tokenizers" / f"{corpus.fingerprint}-bpe{vocab_size}.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    train_text, _ = split_text(corpus.text, val_fraction)
    chunk = 1 << 16
    tok.train_from_iterator((train_text[i : i + chunk] for i in range(0, len(train_text), chunk)), trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tok.save(str(tmp))
    os.replace(tmp, path)
    return tok


@dataclass(frozen=True)
class TokenData:
    """Memory-mapped token arrays of one corpus under one tokenizer.

    Args:
        train, val: uint16/int32 token arrays (memory-mapped from the cache).
        vocab_size: size of the vocabulary (256 for ``bytes``).
        corpus: the corpus' name; fingerprint: its fingerprint.
        test: the test split's tokens (``None`` without a test split).
    """

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    corpus: str
    fingerprint: str
    test: np.ndarray | None = None


def token_data(corpus: Corpus, tokenizer: str = "bytes", vocab_size: int = 4096, val_fraction: float = 0.1,
               test_fraction: float = 0.0) -> TokenData:  # fmt: skip
    """Tokenize the corpus into cached, memory-mapped arrays.

    Args:
        corpus: the text.
        tokenizer: ``"bytes"`` (default) or ``"bpe"`` (trained on the training split).
        vocab_size: the BPE vocabulary size (default 4096; ``bytes`` has 256).
        val_fraction: the held-out last part of the text (default 0.1): validation, and test if asked.
        test_fraction: the last part of the text held out as the test split, out of ``val_fraction`` (default
            0: none, the whole held-out part is validation).
    """
    if tokenizer not in ("bytes", "bpe"):
        raise ValueError(f"tokenizer must be 'bytes' or 'bpe', got {tokenizer!r}")
    vocab = 256 if tokenizer == "bytes" else vocab_size
    key = f"{corpus.fingerprint}-{tokenizer}{vocab if tokenizer == 'bpe' else ''}-val{val_fraction}"
    splits = ("train", "val")
    if test_fraction:
        key += f"-test{test_fraction}"
        splits = ("train", "test", "val")
    folder = cache_dir() / "tokens" / key
    if not (folder / "val.npy").is_file():
        train_text, held_out = split_text(corpus.text, val_fraction)
        val_text, test_text = split_held_out(held_out, val_fraction, test_fraction)
        if tokenizer == "bytes":
            encode = lambda t: np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.uint16)  # noqa: E731
        else:
            tok = get_tokenizer(corpus, vocab_size, val_fraction)
            dtype = np.uint16 if vocab <= 65535 else np.int32
            encode = lambda t: np.asarray(tok.encode(t).ids, dtype=dtype)  # noqa: E731
        folder.mkdir(parents=True, exist_ok=True)
        texts = {"train": train_text, "val": val_text, "test": test_text}
        for split in splits:
            tmp = folder / f"{split}.tmp.npy"
            np.save(tmp, encode(texts[split]))
            os.replace(tmp, folder / f"{split}.npy")  # val last: its presence marks a complete cache
    arrays = {split: np.load(folder / f"{split}.npy", mmap_mode="r") for split in splits}
    return TokenData(arrays["train"], arrays["val"], vocab, corpus.name, corpus.fingerprint, arrays.get("test"))
