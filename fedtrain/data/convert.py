"""Open any store by its file, write any ``FederatedData`` to any format, inspect one."""

from __future__ import annotations

import json
import math
import os
import zipfile
import zlib
from collections.abc import Mapping

import numpy as np

from fedtrain.data.codec import CodecError, decode_object_array, encode_object_array
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


NPZ_HEADER = "__fedtrain__"
NPZ_VERSION = 2
OBJECT_ENCODING = "msgpack-object"
_MAX_DEFLATE_RATIO = 1100  # deflate cannot expand data more than ~1032x
_REWRITE = ("fedtrain never unpickles files. Re-write it with fedtrain >= 0.2 (`fedtrain data convert`) "
            "from the original source.")


def save_npz(data, path: str | os.PathLike) -> str:
    """Saves all clients in one ``.npz``; small data only.

    Members: ``<client_index>/<feature>`` arrays, and ``__fedtrain__``, uint8 JSON
    ``{"format": "fedtrain-npz", "version": 2, "client_ids": [...], "encoded": {member: "msgpack-object"}}``.
    Object arrays (ragged or variable-length features) are stored as uint8 msgpack
    blobs (``codec.encode_object_array``) named in ``encoded``, so the file holds no
    pickle and ``load_npz`` never unpickles.
    """
    ids = list(data.client_ids)
    arrays, encoded = {}, {}
    for i, cid in enumerate(ids):
        for k, v in data.get_client(cid).items():
            key, arr = f"{i}/{k}", np.asarray(v)
            if arr.dtype == object:
                try:
                    arr = np.frombuffer(encode_object_array(arr), np.uint8)
                except CodecError as err:
                    raise ValueError(f"client {cid!r}, feature {k!r}: {err}") from None
                encoded[key] = OBJECT_ENCODING
            elif arr.dtype.hasobject:
                raise ValueError(f"client {cid!r}, feature {k!r}: dtype {arr.dtype} has object fields, which an npz "
                                 "can only hold pickled; use plain numeric or object arrays.")
            arrays[key] = arr
    header = {"format": "fedtrain-npz", "version": NPZ_VERSION, "client_ids": [str(c) for c in ids],
              "encoded": encoded}
    arrays[NPZ_HEADER] = np.frombuffer(json.dumps(header).encode("utf-8"), np.uint8)
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)
    return os.fspath(path)


def _read_npy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: str, archive_size: int) -> np.ndarray:
    """One ``.npy`` member, without pickle and without trusting its declared shape.

    The header is checked before anything is allocated: no object dtype, and the
    declared shape must match the member's size, which must fit the archive.
    """
    name = info.filename[:-4]
    if info.flag_bits & 0x1:
        raise StoreError(f"{path}: member {name} is encrypted; fedtrain reads plain npz files only.")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise StoreError(f"{path}: member {name} uses zip compression method {info.compress_type}; numpy writes "
                         "stored or deflated members only.")
    if info.header_offset + info.compress_size > archive_size or (
            info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size) or (
            info.file_size > _MAX_DEFLATE_RATIO * info.compress_size + (1 << 20)):
        raise StoreError(f"{path}: member {name} declares {info.file_size} bytes from {info.compress_size} stored "
                         "bytes, which the archive cannot hold; the file is corrupt or crafted.")
    fmt = np.lib.format
    with zf.open(info) as f:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(f)
        else:
            raise StoreError(f"{path}: member {name} is in .npy format {version}; fedtrain reads 1.0 and 2.0.")
        if dtype.hasobject:
            raise StoreError(f"{path}: member {name} is a pickled object array; {_REWRITE}")
        count = math.prod(shape)
        nbytes = count * dtype.itemsize
        if info.file_size - f.tell() != nbytes:
            raise StoreError(f"{path}: member {name} declares shape {tuple(shape)} of {dtype} ({nbytes} bytes) but "
                             f"holds {info.file_size - f.tell()} bytes; the file is corrupt or truncated.")
        arr = np.empty(count, dtype)
        if nbytes:
            buf, pos = arr.view(np.uint8), 0
            while pos < nbytes:
                chunk = f.read(min(1 << 22, nbytes - pos))
                if not chunk:
                    raise StoreError(f"{path}: member {name} is truncated; the file is corrupt.")
                buf[pos:pos + len(chunk)] = np.frombuffer(chunk, np.uint8)
                pos += len(chunk)
    if fortran:
        return arr.reshape(shape[::-1]).transpose()
    return arr.reshape(shape)


def load_npz_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """``{name: array}`` of any ``.npz`` of plain arrays, read without pickle (``StoreError`` if it holds one)."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with zipfile.ZipFile(path) as zf:
            out = {}
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    raise StoreError(f"{path}: member {info.filename!r} is not an .npy array; this is not an npz "
                                     "file.")
                out[info.filename[:-4]] = _read_npy_member(zf, info, path, size)
            return out
    except FileNotFoundError:
        if os.path.exists(path):
            raise
        raise FileNotFoundError(f"{path} does not exist; check the path, or download/convert the data "
                                "first.") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as err:
        if isinstance(err, StoreError):
            raise
        raise StoreError(f"{path} is not a readable npz file ({type(err).__name__}: {err}); it is corrupt or "
                         "truncated.") from err


def _npz_header(arrays: dict, path: str) -> tuple[list[str], dict]:
    if NPZ_HEADER not in arrays:
        if "__client_ids__" in arrays:  # fedtrain < 0.2 wrote the ids as an object array; a plain one is fine
            ids = arrays.pop("__client_ids__")
            if ids.ndim != 1 or ids.dtype.kind not in "US":
                raise StoreError(f"{path}: member __client_ids__ is not a 1-d string array.")
            return [str(c) for c in ids.tolist()], {}
        raise StoreError(f"{path} has no member {NPZ_HEADER}; it is not an npz written by fedtrain (members: "
                         f"{sorted(arrays)[:5]}).")
    raw = arrays.pop(NPZ_HEADER)
    try:
        if raw.dtype != np.uint8 or raw.ndim != 1:
            raise ValueError(f"dtype {raw.dtype}, {raw.ndim} dimensions")
        header = json.loads(raw.tobytes().decode("utf-8"))
        if not isinstance(header, dict) or header.get("format") != "fedtrain-npz":
            raise ValueError("no 'format': 'fedtrain-npz'")
    except (ValueError, UnicodeDecodeError) as err:
        raise StoreError(f"{path}: member {NPZ_HEADER} is not fedtrain's JSON header ({err}).") from err
    if header.get("version") != NPZ_VERSION:
        raise StoreError(f"{path} is fedtrain npz version {header.get('version')!r}; this fedtrain reads version "
                         f"{NPZ_VERSION}. Upgrade fedtrain, or convert the file with the version that wrote it.")
    ids, encoded = header.get("client_ids"), header.get("encoded", {})
    if not isinstance(ids, list) or not all(isinstance(c, str) for c in ids) or not isinstance(encoded, dict):
        raise StoreError(f"{path}: the {NPZ_HEADER} header needs a list of string client_ids and a dict encoded.")
    return ids, encoded


def load_npz(path: str | os.PathLike) -> InMemoryFederatedData:
    """Inverse of ``save_npz`` (loads into memory). Never unpickles: a pickled member raises ``StoreError``."""
    path = os.fspath(path)
    arrays = load_npz_arrays(path)
    ids, encoded = _npz_header(arrays, path)
    clients = {c: {} for c in ids}
    for key, arr in arrays.items():
        i, _, feature = key.partition("/")
        if not (i.isdigit() and feature) or int(i) >= len(ids):
            raise StoreError(f"{path}: member {key!r} is not <client index>/<feature> for one of the "
                             f"{len(ids)} clients; it is not an npz written by fedtrain.")
        enc = encoded.get(key)
        if enc is not None:
            if enc != OBJECT_ENCODING or arr.dtype != np.uint8 or arr.ndim != 1:
                raise StoreError(f"{path}: member {key!r} is marked {enc!r} but is not a uint8 msgpack blob.")
            try:
                arr = decode_object_array(arr.tobytes())
            except CodecError as err:
                raise StoreError(f"{path}: member {key!r}: {err}; the file is corrupt.") from err
        clients[ids[int(i)]][feature] = arr
    try:
        return InMemoryFederatedData(clients)
    except ValueError as err:
        raise StoreError(f"{path}: {err}") from err


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
