"""Open any store by its file, write any ``FederatedData`` to any format, inspect one."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from fedtrain.data.federated_data import InMemoryFederatedData
from fedtrain.data.fedjax_sqlite import FedjaxSQLiteData, sqlite_tables, write_fedjax_sqlite
from fedtrain.data.store import StoreError
from fedtrain.data.tff_hdf5 import HDF5_SIGNATURE, TFFHDF5Data, write_tff_hdf5
from fedtrain.data.tff_sqlite import TFFSQLiteData, write_tff_sqlite

FORMATS = ("fedjax-sqlite", "tff-sqlite", "tff-hdf5", "npz")
SQLITE_SIGNATURE = b"SQLite format 3\x00"


def detect_format(path: str | os.PathLike) -> str:
    """``'fedjax-sqlite'``, ``'tff-sqlite'``, ``'tff-hdf5'`` or ``'npz'``, from the file's contents."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist; check the path.")
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(SQLITE_SIGNATURE):
        tables = sqlite_tables(path)
        if "federated_data" in tables:
            return "fedjax-sqlite"
        if "examples" in tables and "client_metadata" in tables:
            return "tff-sqlite"
        raise StoreError(f"{path} is SQLite but has neither FedJAX's table federated_data nor TFF's tables "
                         f"examples/client_metadata (tables: {sorted(tables)}).")
    if head.startswith(HDF5_SIGNATURE):
        return "tff-hdf5"
    if head.startswith(b"PK"):
        return "npz"
    if path.endswith((".lzma", ".xz", ".bz2", ".gz", ".tar")):
        raise StoreError(f"{path} is compressed; decompress it first (e.g. `unxz -k`, `tar xjf`).")
    raise StoreError(f"{path} is not a SQLite, HDF5 or npz file (first bytes {head[:8]!r}); it is corrupt, "
                     "truncated, or in an unsupported format.")


def format_for_output(path: str | os.PathLike, fmt: str | None = None) -> str:
    """The format to write: ``fmt`` if given, else from the extension (.h5/.hdf5, .npz, else FedJAX SQLite)."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; use one of {FORMATS}.")
        return fmt
    ext = os.path.splitext(os.fspath(path))[1].lower()
    return {".h5": "tff-hdf5", ".hdf5": "tff-hdf5", ".npz": "npz"}.get(ext, "fedjax-sqlite")


def open_store(path: str | os.PathLike, *, split: str | None = None, features=None):
    """The ``FederatedData`` in a file of any supported format (``split`` for TFF SQLite files)."""
    fmt = detect_format(path)
    if fmt != "tff-sqlite" and features is not None:
        raise ValueError("features= only applies to TFF SQLite files.")
    if fmt == "fedjax-sqlite":
        return FedjaxSQLiteData(path)
    if fmt == "tff-sqlite":
        return TFFSQLiteData(path, split, features=features)
    if fmt == "tff-hdf5":
        return TFFHDF5Data(path)
    return load_npz(path)


def save_npz(data, path: str | os.PathLike) -> str:
    """Saves all clients in one ``.npz`` (``<client_index>/<feature>`` plus ``__client_ids__``); small data only."""
    ids = list(data.client_ids)
    arrays = {"__client_ids__": np.array(ids, dtype=object)}
    for i, cid in enumerate(ids):
        for k, v in data.get_client(cid).items():
            arrays[f"{i}/{k}"] = np.asarray(v)
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)
    return os.fspath(path)


def load_npz(path: str | os.PathLike) -> InMemoryFederatedData:
    """Inverse of ``save_npz`` (loads into memory)."""
    try:
        with np.load(path, allow_pickle=True) as z:
            ids = list(z["__client_ids__"])
            clients = {str(c): {} for c in ids}
            for key in z.files:
                if key == "__client_ids__":
                    continue
                i, feature = key.split("/", 1)
                clients[str(ids[int(i)])][feature] = z[key]
    except (KeyError, ValueError, OSError) as err:
        raise StoreError(f"{path} is not an npz written by fedtrain ({err}).") from err
    return InMemoryFederatedData(clients)


def to_memory(data) -> InMemoryFederatedData:
    """All clients of ``data`` loaded into an ``InMemoryFederatedData``."""
    return InMemoryFederatedData({c: data.get_client(c) for c in data.client_ids})


def write_store(data, path: str | os.PathLike, fmt: str | None = None, *, split: str = "train",
                overwrite: bool = False) -> str:
    """Writes ``data`` (FederatedData or ``{id: examples}``) to ``path`` in ``fmt`` (default: by extension)."""
    fmt = format_for_output(path, fmt)
    if fmt == "fedjax-sqlite":
        return write_fedjax_sqlite(data, path, overwrite=overwrite)
    if fmt == "tff-sqlite":
        return write_tff_sqlite({split: data}, path, overwrite=overwrite)
    if fmt == "tff-hdf5":
        return write_tff_hdf5(data, path, overwrite=overwrite)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; delete it or pass overwrite=True (--overwrite).")
    if isinstance(data, Mapping):
        data = InMemoryFederatedData(data)
    return save_npz(data, path)


def convert(src: str | os.PathLike, dst: str | os.PathLike, fmt: str | None = None, *,
            split: str | None = None, overwrite: bool = False) -> str:
    """Copies every client of the file ``src`` into ``dst`` (format ``fmt`` or by extension)."""
    data = open_store(src, split=split)
    try:
        return write_store(data, dst, fmt, split=split or getattr(data, "split", "train"), overwrite=overwrite)
    finally:
        if hasattr(data, "close"):
            data.close()


def describe(data, *, max_clients_for_features: int = 1) -> dict:
    """Summary: clients, examples, size quantiles and per-feature shape/dtype (from the first client)."""
    ids = list(data.client_ids)
    sizes_fn = getattr(data, "client_sizes", None)
    sizes = np.asarray(sizes_fn() if sizes_fn else [data.client_size(c) for c in ids], np.int64)
    features = {}
    for cid in ids[:max_clients_for_features]:
        for k, v in data.get_client(cid).items():
            v = np.asarray(v)
            features[k] = {"shape": list(v.shape[1:]), "dtype": str(v.dtype)}
    q = [0, 10, 25, 50, 75, 90, 99, 100]
    quantiles = dict(zip(q, np.percentile(sizes, q).tolist())) if len(sizes) else {}
    return {"num_clients": len(ids), "num_examples": int(sizes.sum()), "size_quantiles": quantiles,
            "features": features, "sizes": sizes}
