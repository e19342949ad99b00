"""Federated EMNIST: 28x28 handwritten characters, one client per writer.

``source='fedjax'`` (default) fetches FedJAX's SQLite files, ``'tff'`` TFF's
``emnist_all.sqlite.lzma``, ``'tff-hdf5'`` TFF's legacy ``fed_emnist*.tar.bz2``;
``'synthetic'`` generates seeded data of the same shape and sizes offline.
Features after preprocessing (FedJAX's): ``x = 1 - pixels[..., None]`` float32
[N,28,28,1], ``y = label`` int32, ``domain_id`` int32 (0 = high-school writer
ids 2100-2599, 1 = census writer).
"""

from __future__ import annotations

import os
import re

import numpy as np

from fedtrain.data.download import Remote, download, fetch_lzma, fetch_member
from fedtrain.data.fedjax_sqlite import FedjaxSQLiteData
from fedtrain.data.synthetic import SyntheticFederatedData
from fedtrain.data.tff_hdf5 import TFFHDF5Data
from fedtrain.data.tff_sqlite import TFFSQLiteData

# FedJAX's sqlite files and TFF's emnist_all.sqlite.lzma are unpinned: neither project's download code
# lists a size or sha256 for them, so only the sidecar record of the first download guards them.
FEDJAX_URL = "https://storage.googleapis.com/gresearch/fedjax/emnist/"
TFF_URL = "https://storage.googleapis.com/tff-datasets-public/"
TFF_SQLITE = Remote(TFF_URL + "emnist_all.sqlite.lzma", "emnist_all.sqlite.lzma")
# sha256 of TFF's legacy archives, from tff.simulation.datasets.emnist.load_data (TFF 0.17 and before, which
# fetched them with tf.keras.utils.get_file(file_hash=...)); TFF gives no sizes.
TFF_HDF5 = {
    False: Remote(TFF_URL + "fed_emnist.tar.bz2", "fed_emnist.tar.bz2",
                  sha256="fe1ed5a502cea3a952eb105920bff8cffb32836b5173cb18a57a32c3606f3ea0"),
    True: Remote(TFF_URL + "fed_emnist_digitsonly.tar.bz2", "fed_emnist_digitsonly.tar.bz2",
                 sha256="55333deb8546765427c385710ca5e7301e16f4ed8b60c1dc5ae224b42bd5b14b"),
}
SPLITS = ("train", "test")
SOURCES = ("fedjax", "tff", "tff-hdf5", "synthetic")
TFF_FEATURES = {"pixels": ((28, 28), np.float32), "label": ((), np.int32)}
_WRITER = re.compile(r"^(?:[0-9a-f]{16}:)?f(\d{4})_\d{2}$")


def domain_id(client_id: str) -> int:
    """0 for high-school writers (``f2100_xx``..``f2599_xx``), 1 for census writers."""
    m = _WRITER.match(client_id)
    if m is None:
        raise ValueError(f"client id {client_id!r} is not an EMNIST writer id ('f####_##' or '<16 hex>:f####_##').")
    return 0 if 2100 <= int(m.group(1)) <= 2599 else 1


def preprocess_client(client_id: str, examples: dict) -> dict:
    """FedJAX's EMNIST preprocessing plus ``domain_id`` (``-1`` for ids that are not writer ids)."""
    pixels = np.asarray(examples["pixels"], np.float32)
    n = len(pixels)
    try:
        dom = domain_id(client_id)
    except ValueError:
        dom = -1
    return {"x": 1.0 - pixels[..., None], "y": np.asarray(examples["label"]).astype(np.int32),
            "domain_id": np.full(n, dom, np.int32)}


def raw_split(split: str, *, only_digits: bool = False, source: str = "fedjax", cache_dir=None,
              progress: bool = True):
    """The raw ``{pixels, label}`` store of one split, downloaded and cached."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}.")
    if source == "fedjax":
        name = f"federated_emnist_{'digitsonly_' if only_digits else ''}{split}.sqlite"
        return FedjaxSQLiteData(download(Remote(FEDJAX_URL + name, name), cache_dir, progress=progress))
    if source == "tff":
        path = fetch_lzma(TFF_SQLITE, cache_dir, progress=progress)
        tff_split = f"{'digits_only' if only_digits else 'all'}_{split}"
        return TFFSQLiteData(path, tff_split, features=TFF_FEATURES)
    if source == "tff-hdf5":
        member = f"fed_emnist{'_digitsonly' if only_digits else ''}_{split}.h5"
        return TFFHDF5Data(fetch_member(TFF_HDF5[bool(only_digits)], member, cache_dir, progress=progress))
    if source == "synthetic":
        data = SyntheticFederatedData.like("emnist_digits" if only_digits else "emnist",
                                           seed=0 if split == "train" else 1)
        return data.subset(data.client_ids)
    raise ValueError(f"unknown source {source!r}; use one of {SOURCES}.")


def load_data(split: str | None = None, *, only_digits: bool = False, source: str = "fedjax",
              cache_dir: str | os.PathLike | None = None, progress: bool = True):
    """Preprocessed federated EMNIST (``{x, y, domain_id}``); ``split=None`` returns ``(train, test)``."""
    if split is None:
        return tuple(load_data(s, only_digits=only_digits, source=source, cache_dir=cache_dir, progress=progress)
                     for s in SPLITS)
    raw = raw_split(split, only_digits=only_digits, source=source, cache_dir=cache_dir, progress=progress)
    if source == "synthetic":  # synthetic ids are not writer ids: domain_id is -1
        return raw.preprocess(lambda ex: preprocess_client("", ex))
    return raw.preprocess(preprocess_client, keeps_size=True, with_client_id=True)
