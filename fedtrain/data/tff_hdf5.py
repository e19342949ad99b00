"""TFF's legacy HDF5 format: ``examples/<client_id>/<feature>``, one dataset per feature.

Text features are variable-length strings, read back as object arrays of
``bytes`` (as TFF's readers see them). Clients are listed in the file's
(alphabetical) group order.

Checksums: fedtrain writes numeric datasets chunked with HDF5's ``fletcher32``
filter (h5py, TFF and any HDF5 reader verify it on read). HDF5 allows no
filter on variable-length strings, so those carry a ``fedtrain_sha256``
attribute instead (ignored by other readers). A dataset whose checksum fails
raises ``StoreError`` naming the client and feature.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping

import h5py
import numpy as np

from fedtrain.data.federated_data import ClientId, Examples, num_examples_of
from fedtrain.data.store import AtomicFile, FileStore, StoreError, StoreWriter, validated

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


CHECKSUM_ATTR = "fedtrain_sha256"
_CHUNK_BYTES = 1 << 20  # target chunk size: a typical client's feature is one chunk


def _open(path: str) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as err:
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} does not exist; check the path, or download/convert the data "
                                    "first.") from None
        raise StoreError(f"{path} is not a readable HDF5 file ({err}); it is corrupt or truncated: "
                         "download or convert it again.") from err


_MAX_EXPANSION = 1100  # deflate, HDF5's usual filter, cannot expand data more than ~1032x
_SMALL = 1 << 20  # fill-value and tiny datasets may declare this much beyond their storage
_LINK_KINDS = {h5py.SoftLink: "soft link", h5py.ExternalLink: "external link"}


def _article(noun: str) -> str:
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


def _link_kind(link) -> str:
    return _LINK_KINDS.get(type(link), type(link).__name__)


def _object_dtype_ok(dtype: np.dtype) -> bool:
    """Object dtypes fedtrain reads: variable-length strings/bytes and variable-length numeric sequences."""
    if h5py.check_string_dtype(dtype) is not None:
        return True
    base = h5py.check_vlen_dtype(dtype)
    return base is not None and np.dtype(base).kind in "biuf"


def _checked_dataset(path: str, client_id: ClientId, group: h5py.Group, name: str) -> h5py.Dataset:
    """``group[name]`` once it is a plain local dataset of a supported dtype whose declared size fits its storage.

    Refused: soft and external links, external raw storage and virtual datasets (they read other files),
    references, opaque and compound-with-object dtypes, and shapes far larger than the bytes the file holds
    for them (reading would allocate the declared size).
    """
    where = f"{path}: client {client_id!r}, feature {name!r}"
    link = group.get(name, getlink=True)
    if not isinstance(link, h5py.HardLink):
        raise StoreError(f"{where} is {_article(_link_kind(link))}; fedtrain reads only datasets stored in the file "
                         "itself.")
    ds = group[name]
    if not isinstance(ds, h5py.Dataset):
        raise StoreError(f"{where} is a {type(ds).__name__}, expected a dataset.")
    if ds.shape is None:
        raise StoreError(f"{where} has an empty (null) dataspace; every feature needs an example axis.")
    dtype = ds.dtype
    if dtype.hasobject and not (dtype.kind == "O" and _object_dtype_ok(dtype)):
        raise StoreError(f"{where} has dtype {dtype} (e.g. references or objects); fedtrain reads numeric "
                         "datasets and variable-length strings only.")
    if dtype.kind == "V" and dtype.names is None and dtype.subdtype is None:
        raise StoreError(f"{where} has an opaque dtype {dtype}; fedtrain reads numeric and string datasets only.")
    dcpl = ds.id.get_create_plist()
    if dcpl.get_layout() == h5py.h5d.VIRTUAL or dcpl.get_external_count():
        raise StoreError(f"{where} keeps its data in other files (virtual or external storage); fedtrain reads "
                         "only data stored in the file itself.")
    declared = int(ds.size) * dtype.itemsize
    stored = ds.id.get_storage_size()
    if declared > _MAX_EXPANSION * stored + _SMALL:
        raise StoreError(f"{where} declares shape {ds.shape} ({declared} bytes) but the file stores {stored} bytes "
                         "for it; the file is corrupt or crafted.")
    return ds


def _items_sha256(items) -> str:
    """sha256 of a flat sequence of ``bytes``, each prefixed by its length (so item boundaries count)."""
    h = hashlib.sha256()
    for v in items:
        h.update(len(v).to_bytes(8, "little"))
        h.update(v)
    return h.hexdigest()


def _chunks(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...] | bool:
    """Chunks along the example axis of about ``_CHUNK_BYTES``; ``True`` (h5py's guess) for empty datasets."""
    if not shape or 0 in shape:
        return True
    row = max(1, int(np.prod(shape[1:], dtype=np.int64)) * itemsize)
    return (max(1, min(shape[0], _CHUNK_BYTES // row)), *shape[1:])


def _read_dataset(path: str, client_id: ClientId, ds: h5py.Dataset, name: str) -> np.ndarray:
    """``ds[()]`` with checksum failures reported as ``StoreError`` naming the client and feature."""
    where = f"{path}: client {client_id!r}, feature {name!r}"
    try:
        arr = ds[()]
    except (OSError, RuntimeError) as err:
        if ds.fletcher32:
            raise StoreError(f"{where} fails its fletcher32 checksum or is cut off ({err}); the file is corrupt: "
                             "download or convert it again.") from err
        raise StoreError(f"{where} cannot be read ({err}); the file is corrupt or truncated: download or "
                         "convert it again.") from err
    arr = _plain(arr)
    want = ds.attrs.get(CHECKSUM_ATTR)
    if want is not None and arr.dtype.kind == "O":
        want = want.decode("ascii", "replace") if isinstance(want, bytes) else str(want)
        items = [v if isinstance(v, bytes) else str(v).encode("utf-8") for v in arr.ravel().tolist()]
        if _items_sha256(items) != want:
            raise StoreError(f"{where} fails its sha256 checksum (attribute {CHECKSUM_ATTR}); the file is corrupt: "
                             "download or convert it again.")
    return arr


def _plain(arr: np.ndarray) -> np.ndarray:
    """Drops h5py's string metadata so object arrays are plain ``dtype=object`` arrays of bytes."""
    if isinstance(arr, np.ndarray) and arr.dtype.kind == "O":
        out = np.empty(arr.shape, dtype=object)
        out[...] = arr
        return out
    return np.asarray(arr)


class TFFHDF5Data(FileStore):
    """A TFF HDF5 file (``examples/<client_id>/<feature>``) as ``FederatedData``."""

    format_name = "tff-hdf5"

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        f = self._handle()
        if "examples" not in f or not isinstance(f["examples"], h5py.Group):
            raise StoreError(f"{self.path} has no group 'examples' (top level: {sorted(f.keys())[:10]}); "
                             "it is not a TFF HDF5 file (examples/<client_id>/<feature>).")
        try:
            self._ids = list(f["examples"].keys())
        except (OSError, RuntimeError, KeyError) as err:
            raise StoreError(f"{self.path}: cannot list clients ({err}); the file is corrupt or truncated.") from err
        self._size_cache: dict[ClientId, int] = {}

    def _open_handle(self):
        return _open(self.path)

    def _group(self, client_id: ClientId) -> h5py.Group:
        try:
            examples = self._handle()["examples"]
            link = examples.get(client_id, getlink=True)
            if not isinstance(link, h5py.HardLink):
                raise StoreError(f"{self.path}: examples/{client_id} is {_article(_link_kind(link))}; fedtrain "
                                 "reads only groups stored in the file itself.")
            group = examples[client_id]
        except FileNotFoundError:
            raise
        except (OSError, RuntimeError) as err:
            raise StoreError(f"{self.path}: reading client {client_id!r} failed ({err}); the file is corrupt "
                             "or truncated: download or convert it again.") from err
        if not isinstance(group, h5py.Group):
            raise StoreError(f"{self.path}: examples/{client_id} is a dataset, expected a group of features.")
        return group

    def _raw_size(self, client_id: ClientId) -> int:
        size = self._size_cache.get(client_id)
        if size is None:
            group = self._group(client_id)
            shapes = {name: _checked_dataset(self.path, client_id, group, name).shape for name in group}
            # zero-size stand-ins with the declared leading axis: nothing is allocated from the declared shapes
            size = num_examples_of({k: np.empty((*s[:1], 0) if s else ()) for k, s in shapes.items()},
                                   where=f"client {client_id!r} of {self.path}")
            self._size_cache[client_id] = size
        return size

    def _read(self, client_id: ClientId) -> Examples:
        group = self._group(client_id)
        try:
            examples = {name: _read_dataset(self.path, client_id, _checked_dataset(self.path, client_id, group, name),
                                            name) for name in group}
        except (OSError, RuntimeError) as err:
            raise StoreError(f"{self.path}: reading client {client_id!r} failed ({err}); the file is corrupt "
                             "or truncated: download or convert it again.") from err
        num_examples_of(examples, where=f"client {client_id!r} of {self.path}")
        return examples


class TFFHDF5Writer(StoreWriter):
    """Writes a TFF HDF5 file: ``add(client_id, examples)``, then ``close()`` (or use ``with``).

    ``checksum=True`` (the default) stores numeric features chunked with the ``fletcher32`` filter
    and text features with a ``fedtrain_sha256`` attribute, so a flipped byte is reported on read.
    """

    def __init__(self, path: str | os.PathLike, *, overwrite: bool = False, compression: str | None = None,
                 checksum: bool = True):
        self._file = AtomicFile(path, overwrite)
        self.path = self._file.path
        self._h5 = h5py.File(self._file.partial, "w")
        self._examples = self._h5.create_group("examples")
        self._compression = compression
        self._checksum = checksum

    def add(self, client_id: ClientId, examples: Mapping[str, np.ndarray]) -> None:
        client_id = str(client_id)
        if "/" in client_id or client_id in (".", ""):
            raise ValueError(f"client id {client_id!r} cannot be an HDF5 group name; ids must not contain '/'.")
        if client_id in self._examples:
            raise ValueError(f"client id {client_id!r} is written twice to {self.path}; client ids must be unique.")
        arrays, _ = validated(client_id, examples, self.path)
        group = self._examples.create_group(client_id)
        for name, arr in arrays.items():
            if arr.dtype.kind in "OU":
                items = [v if isinstance(v, bytes) else str(v).encode("utf-8") for v in arr.ravel().tolist()]
                data = np.empty(len(items), dtype=object)
                data[:] = items
                ds = group.create_dataset(name, data=data.reshape(arr.shape), dtype=h5py.special_dtype(vlen=bytes))
                if self._checksum:
                    ds.attrs[CHECKSUM_ATTR] = _items_sha256(items)
            elif self._checksum:
                group.create_dataset(name, data=arr, compression=self._compression, fletcher32=True,
                                     chunks=_chunks(arr.shape, arr.dtype.itemsize))
            else:
                group.create_dataset(name, data=arr, compression=self._compression)

    def close(self) -> None:
        self._h5.close()
        self._file.commit()

    def abort(self) -> None:
        self._h5.close()
        self._file.abort()


def write_tff_hdf5(data, path: str | os.PathLike, *, overwrite: bool = False, compression: str | None = None,
                   checksum: bool = True) -> str:
    """Writes every client of ``data`` (a FederatedData or ``{id: examples}``) to ``path``.

    ``checksum=True`` (the default): fletcher32 on numeric features, a sha256 attribute on text ones.
    """
    items = data.items() if isinstance(data, Mapping) else ((c, data.get_client(c)) for c in data.client_ids)
    with TFFHDF5Writer(path, overwrite=overwrite, compression=compression, checksum=checksum) as writer:
        writer.add_many(items)
    return os.fspath(path)
