"""Federated Stack Overflow next-word prediction: one client per user, one example per sentence.

``source='fedjax'`` (default) fetches FedJAX's SQLite files, ``'tff'`` TFF's
``stackoverflow.sqlite.lzma``; ``'synthetic'`` generates already-tokenized
data of the same shape offline. The vocabulary is the top ``vocab_size``
words of the official word-count file (``word count`` per line, most
frequent first). Ids: PAD=0, BOS=1, EOS=2, word of rank r -> r+3, unknown
words -> one of ``num_oov_buckets`` ids after the vocabulary (CRC32 hash).
``x = [BOS] + ids``, ``y = ids + [EOS]``, padded/truncated to ``max_length``
(20 for training, 30 for evaluation). ``domain_id`` is 1 for answers, 0 for questions.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence

import numpy as np

from fedtrain.data.download import Remote, download, fetch_lzma
from fedtrain.data.fedjax_sqlite import FedjaxSQLiteData
from fedtrain.data.synthetic import SyntheticFederatedData
from fedtrain.data.tff_sqlite import TFFSQLiteData

# Unpinned: neither FedJAX nor TFF lists a size or sha256 for FedJAX's sqlite files, the plain word-count
# file or TFF's stackoverflow.sqlite.lzma (TFF pins only the .tar.bz2 word/tag counts, which fedtrain does
# not fetch), so only the sidecar record of the first download guards them.
FEDJAX_URL = "https://storage.googleapis.com/gresearch/fedjax/stackoverflow/"
WORD_COUNT = Remote(FEDJAX_URL + "stackoverflow.word_count", "stackoverflow.word_count")
TFF_SQLITE = Remote("https://storage.googleapis.com/tff-datasets-public/stackoverflow.sqlite.lzma",
                    "stackoverflow.sqlite.lzma")
SPLITS = {"fedjax": ("train", "held_out", "test"), "tff": ("train", "heldout", "test"),
          "synthetic": ("train", "held_out", "test")}
PAD, BOS, EOS = 0, 1, 2
TRAIN_MAX_LENGTH, EVAL_MAX_LENGTH = 20, 30


def load_vocabulary(path: str | os.PathLike, vocab_size: int = 10_000) -> list[str]:
    """The first ``vocab_size`` words of a word-count file (``word count`` per line)."""
    words: list[str] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if len(words) >= vocab_size:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}, line {lineno}: not UTF-8 ({err}); the vocabulary file must be UTF-8 "
                                 "text.") from None
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not parts[1].isdigit():
                raise ValueError(f"{path}, line {lineno}: expected 'word count', got {line.strip()[:60]!r}; "
                                 "use the official stackoverflow.word_count file (one 'word count' per line, "
                                 "most frequent first).")
            words.append(parts[0])
    if not words:
        raise ValueError(f"{path} holds no words; expected lines of 'word count'.")
    return words


class Tokenizer:
    """Words -> ids with PAD/BOS/EOS and OOV buckets; sentences -> ``(x, y)`` of ``max_length``."""

    def __init__(self, vocabulary: Sequence[str], num_oov_buckets: int = 1):
        if num_oov_buckets < 1:
            raise ValueError(f"num_oov_buckets must be >= 1, got {num_oov_buckets}.")
        self.vocabulary = list(vocabulary)
        self.num_oov_buckets = num_oov_buckets
        self._ids = {w.encode("utf-8"): i + 3 for i, w in enumerate(self.vocabulary)}
        self.oov_start = len(self.vocabulary) + 3
        self.vocab_size = self.oov_start + num_oov_buckets

    @classmethod
    def from_word_count(cls, path, vocab_size: int = 10_000, num_oov_buckets: int = 1) -> "Tokenizer":
        return cls(load_vocabulary(path, vocab_size), num_oov_buckets)

    def word_id(self, word: bytes) -> int:
        i = self._ids.get(word)
        if i is not None:
            return i
        return self.oov_start + (zlib.crc32(word) % self.num_oov_buckets if self.num_oov_buckets > 1 else 0)

    def encode(self, sentences, max_length: int = TRAIN_MAX_LENGTH) -> dict[str, np.ndarray]:
        """``{x, y}`` int32 [N, max_length] from space-separated sentences (bytes or str)."""
        n = len(sentences)
        x = np.zeros((n, max_length), np.int32)
        y = np.zeros((n, max_length), np.int32)
        for row, s in enumerate(sentences):
            words = (s if isinstance(s, bytes) else str(s).encode("utf-8")).split(b" ")
            ids = [self.word_id(w) for w in words if w]
            xs, ys = [BOS] + ids, ids + [EOS]
            x[row, :min(len(xs), max_length)] = xs[:max_length]
            y[row, :min(len(ys), max_length)] = ys[:max_length]
        return {"x": x, "y": y}


def preprocess_client(tokenizer: Tokenizer, max_length: int):
    """A client preprocess: ``{tokens, type}`` -> ``{x, y, domain_id}``."""

    def fn(examples):
        out = tokenizer.encode(list(examples["tokens"]), max_length)
        kinds = examples.get("type")
        dom = np.zeros(len(out["x"]), np.int32) if kinds is None else \
            np.array([k == b"answer" or k == "answer" for k in kinds], np.int32)
        return {**out, "domain_id": dom}

    return fn


def raw_split(split: str, *, source: str = "fedjax", cache_dir=None, progress: bool = True):
    """The raw store (``tokens``, ``type``, ``title``, ``tags``, ``score``, ``creation_date``) of one split."""
    if source not in SPLITS:
        raise ValueError(f"unknown source {source!r}; use one of {sorted(SPLITS)}.")
    if split not in SPLITS[source]:
        raise ValueError(f"unknown split {split!r} for source {source!r}; use one of {SPLITS[source]}.")
    if source == "fedjax":
        name = f"stackoverflow_{split}.sqlite"
        return FedjaxSQLiteData(download(Remote(FEDJAX_URL + name, name), cache_dir, progress=progress))
    return TFFSQLiteData(fetch_lzma(TFF_SQLITE, cache_dir, progress=progress), split)


def load_data(split: str = "train", *, source: str = "fedjax", vocab_size: int = 10_000, num_oov_buckets: int = 1,
              max_length: int | None = None, cache_dir: str | os.PathLike | None = None, progress: bool = True):
    """Tokenized Stack Overflow ``{x, y, domain_id}`` of one split (``max_length`` 20 train, 30 otherwise)."""
    if max_length is None:
        max_length = TRAIN_MAX_LENGTH if split == "train" else EVAL_MAX_LENGTH
    if source == "synthetic":
        if split not in SPLITS["synthetic"]:
            raise ValueError(f"unknown split {split!r}; use one of {SPLITS['synthetic']}.")
        vocab = vocab_size + 3 + num_oov_buckets
        data = SyntheticFederatedData.like("stackoverflow", seed=SPLITS["synthetic"].index(split), features={
            "x": ((max_length,), "int32", vocab), "y": ((max_length,), "int32", vocab),
            "domain_id": ((), "int32", 2)})
        # BOS only ever starts x; as a target it would be unreachable (the model masks its logit).
        return data.preprocess(lambda ex: {**ex, "y": np.where(ex["y"] == BOS, EOS, ex["y"]).astype(np.int32)})
    raw = raw_split(split, source=source, cache_dir=cache_dir, progress=progress)
    tokenizer = Tokenizer.from_word_count(download(WORD_COUNT, cache_dir, progress=progress), vocab_size,
                                          num_oov_buckets)
    return raw.preprocess(preprocess_client(tokenizer, max_length), keeps_size=True)
