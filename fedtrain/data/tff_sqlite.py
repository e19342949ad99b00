"""TFF's SQLite format: one serialized ``tf.train.Example`` per row.

Schema (``tff.simulation.datasets.SqlClientData``)::

    CREATE TABLE examples (split_name TEXT NOT NULL, client_id TEXT NOT NULL,
                           serialized_example_proto BLOB NOT NULL);
    CREATE TABLE client_metadata (client_id TEXT NOT NULL, split_name TEXT NOT NULL,
                                  num_examples INTEGER NOT NULL);

A tf.Example keeps only flat lists of bytes, float32 or int64, so shapes and
dtypes come from ``features={name: (shape, dtype)}`` or, in files fedtrain
writes, from an extra table ``fedtrain_features`` (ignored by TFF). Without
either, a feature with one value per example is ``[N]`` and one with ``L``
values ``[N, L]``.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
from collections.abc import Iterable, Mapping

import numpy as np

from fedtrain.data.federated_data import ClientId, Examples
from fedtrain.data.fedjax_sqlite import connect_readonly, sqlite_tables
from fedtrain.data.store import AtomicFile, FileStore, StoreError, StoreWriter, validated
from fedtrain.data.tf_example import BYTES, KIND_NAMES, ExampleParseError, parse_example, serialize_example

SCHEMA = """
CREATE TABLE examples (split_name TEXT NOT NULL, client_id TEXT NOT NULL, serialized_example_proto BLOB NOT NULL);
CREATE INDEX idx_examples_client_id ON examples (client_id);
CREATE INDEX idx_examples_client_id_split ON examples (split_name, client_id);
CREATE TABLE client_metadata (client_id TEXT NOT NULL, split_name TEXT NOT NULL, num_examples INTEGER NOT NULL);
CREATE INDEX idx_metadata_client_id ON client_metadata (client_id);
CREATE TABLE fedtrain_features (split_name TEXT NOT NULL, name TEXT NOT NULL, dtype TEXT NOT NULL, shape TEXT NOT NULL);
"""

FeatureSpec = Mapping[str, tuple[tuple[int, ...], object]]


def tff_splits(path: str) -> list[str]:
    """Split names in a TFF SQLite file."""
    con = connect_readonly(path)
    try:
        return [r[0] for r in con.execute("SELECT DISTINCT split_name FROM client_metadata ORDER BY split_name")]
    finally:
        con.close()


def stack_examples(protos: list[bytes], client_id: ClientId, where: str,
                   spec: FeatureSpec | None = None) -> Examples:
    """Parses a client's tf.Examples and stacks each feature to ``[N, *shape]``."""
    spec = dict(spec or {})
    columns: dict[str, list] = {}
    kinds: dict[str, int] = {}
    for i, blob in enumerate(protos):
        try:
            parsed = parse_example(bytes(blob))
        except ExampleParseError as err:
            raise StoreError(f"{where}: client {client_id!r}, example {i}: {err}; the file is corrupt: "
                             "download or convert it again.") from err
        if i and parsed.keys() != columns.keys():
            raise StoreError(f"{where}: client {client_id!r}, example {i} has features {sorted(parsed)} but "
                             f"example 0 has {sorted(columns)}; every example needs the same features.")
        for name, (kind, values) in parsed.items():
            if i == 0:
                columns[name], kinds[name] = [], kind
            elif kinds[name] != kind and len(values):
                raise StoreError(f"{where}: client {client_id!r}, feature {name!r} is a {KIND_NAMES[kind]} in "
                                 f"example {i} but a {KIND_NAMES[kinds[name]]} in example 0.")
            columns[name].append(values)
    out = {}
    for name, values in columns.items():
        lengths = {len(v) for v in values}
        if len(lengths) > 1:
            raise StoreError(f"{where}: client {client_id!r}, feature {name!r} is ragged (examples hold "
                             f"{sorted(lengths)[:5]} values); fixed-length features only: pad or truncate "
                             "them when writing the file.")
        (length,) = lengths
        if kinds[name] == BYTES:
            arr = np.empty((len(values), length), dtype=object)
            for row, v in enumerate(values):
                arr[row, :] = v
        else:
            arr = np.stack(values) if values else np.zeros((0, length))
        shape, dtype = spec.get(name, (None, None))
        if shape is None:
            shape = () if length == 1 else (length,)
        if math.prod(int(d) for d in shape) != length:
            raise StoreError(f"{where}: client {client_id!r}, feature {name!r} has {length} values per example, "
                             f"which does not fit shape {tuple(shape)}; fix the features= argument.")
        arr = arr.reshape((len(values), *shape))
        if dtype is not None and kinds[name] != BYTES:
            arr = arr.astype(dtype)
        out[name] = arr
    return out


def _stored_feature(path: str, name, dtype, shape) -> tuple[tuple[int, ...], np.dtype | None]:
    """A row of ``fedtrain_features`` as ``(shape, dtype)``: JSON shape of ints, a numeric dtype or 'object'."""
    try:
        dims = json.loads(shape)
        if not isinstance(dims, list) or not all(type(d) is int and d >= 0 for d in dims):
            raise ValueError(f"shape {shape!r} is not a JSON list of non-negative ints")
        if dtype == "object":
            return tuple(dims), None
        np_dtype = np.dtype(dtype)
        if np_dtype.kind not in "biufc" and np_dtype.name != "bfloat16":
            raise ValueError(f"dtype {dtype!r} is not numeric")
    except (TypeError, ValueError) as err:
        raise StoreError(f"{path}: fedtrain_features row for feature {name!r} is invalid ({err}); the file is "
                         "corrupt.") from err
    return tuple(dims), np_dtype


class TFFSQLiteData(FileStore):
    """One split of a TFF SQLite file as ``FederatedData``; clients in ``client_id`` order."""

    format_name = "tff-sqlite"

    def __init__(self, path: str | os.PathLike, split: str | None = None, *, features: FeatureSpec | None = None):
        super().__init__(path)
        tables = sqlite_tables(self.path)
        need = {"examples": {"split_name", "client_id", "serialized_example_proto"},
                "client_metadata": {"client_id", "split_name", "num_examples"}}
        for table, cols in need.items():
            if not cols <= set(tables.get(table, ())):
                hint = (" It looks like a FedJAX file (table federated_data): open it with FedjaxSQLiteData."
                        if "federated_data" in tables else "")
                raise StoreError(f"{self.path} has no table {table}({', '.join(sorted(cols))}) (tables: "
                                 f"{sorted(tables)}); it is not a TFF SQLite file.{hint}")
        try:
            splits = tff_splits(self.path)
            if split is None:
                if len(splits) != 1:
                    raise ValueError(f"{self.path} holds splits {splits}; pass split= (--split) to pick one.")
                split = splits[0]
            elif split not in splits:
                raise ValueError(f"{self.path} has no split {split!r}; it holds {splits}.")
            self.split = split
            con = self._handle()
            rows = con.execute("SELECT client_id, num_examples FROM client_metadata WHERE split_name = ? "
                               "ORDER BY client_id", (split,)).fetchall()
            stored = {}
            if "fedtrain_features" in tables:
                for name, dtype, shape in con.execute(
                        "SELECT name, dtype, shape FROM fedtrain_features WHERE split_name = ?", (split,)):
                    stored[name] = _stored_feature(self.path, name, dtype, shape)
        except sqlite3.DatabaseError as err:
            raise StoreError(f"{self.path}: cannot read the client list ({err}); the file is corrupt or "
                             "truncated: download it again.") from err
        bad = [(c, n) for c, n in rows if type(n) is not int or n < 0]
        if bad:
            raise StoreError(f"{self.path}: client_metadata gives client {bad[0][0]!r} {bad[0][1]!r} examples; "
                             "num_examples must be a non-negative integer. The file is corrupt.")
        self.features = {**stored, **dict(features or {})}
        self._ids = [str(c) for c, _ in rows]
        self._raw_sizes = {str(c): int(n) for c, n in rows}

    def _open_handle(self):
        return connect_readonly(self.path)

    def _read(self, client_id: ClientId) -> Examples:
        try:
            protos = [r[0] for r in self._handle().execute(
                "SELECT serialized_example_proto FROM examples WHERE split_name = ? AND client_id = ? ORDER BY rowid",
                (self.split, client_id))]
        except sqlite3.DatabaseError as err:
            raise StoreError(f"{self.path}: reading client {client_id!r} failed ({err}); the file is corrupt or "
                             "truncated: download it again.") from err
        if not protos:
            raise StoreError(f"{self.path}: client {client_id!r} is in client_metadata but has no examples.")
        if len(protos) != self._raw_sizes[client_id]:
            raise StoreError(f"{self.path}: client_metadata gives client {client_id!r} "
                             f"{self._raw_sizes[client_id]} examples but the examples table holds {len(protos)}; "
                             "the file is corrupt.")
        return stack_examples(protos, client_id, self.path, self.features)


class TFFSQLiteWriter(StoreWriter):
    """Writes splits of a TFF SQLite file: ``add(client_id, examples, split=...)``, then ``close()``."""

    def __init__(self, path: str | os.PathLike, *, overwrite: bool = False):
        self._file = AtomicFile(path, overwrite)
        self.path = self._file.path
        self._con = sqlite3.connect(self._file.partial)
        self._con.executescript(SCHEMA)
        self._features: dict[str, dict[str, tuple[str, tuple]]] = {}

    def add(self, client_id: ClientId, examples: Mapping[str, np.ndarray], split: str = "train") -> None:
        arrays, n = validated(client_id, examples, self.path)
        meta = {k: ("object" if v.dtype.kind in "OSU" else v.dtype.str, v.shape[1:]) for k, v in arrays.items()}
        seen = self._features.setdefault(split, meta)
        if seen != meta:
            raise ValueError(f"client {client_id!r} has features {meta} but earlier clients of split {split!r} "
                             f"have {seen}; every client of a split needs the same feature shapes and dtypes.")
        rows = ((split, str(client_id), serialize_example({k: v[i] for k, v in arrays.items()})) for i in range(n))
        self._con.executemany("INSERT INTO examples VALUES (?, ?, ?)", rows)
        self._con.execute("INSERT INTO client_metadata VALUES (?, ?, ?)", (str(client_id), split, n))

    def add_many(self, items: Iterable[tuple[ClientId, Mapping[str, np.ndarray]]], split: str = "train") -> None:
        for cid, ex in items:
            self.add(cid, ex, split)

    def close(self) -> None:
        for split, meta in self._features.items():
            self._con.executemany("INSERT INTO fedtrain_features VALUES (?, ?, ?, ?)",
                                  [(split, k, np.dtype(d).name if d != "object" else d, json.dumps(list(s)))
                                   for k, (d, s) in meta.items()])
        self._con.commit()
        self._con.close()
        self._file.commit()

    def abort(self) -> None:
        self._con.close()
        self._file.abort()


def write_tff_sqlite(splits: Mapping[str, object], path: str | os.PathLike, *, overwrite: bool = False) -> str:
    """Writes ``{split_name: FederatedData or {id: examples}}`` to a TFF SQLite file."""
    with TFFSQLiteWriter(path, overwrite=overwrite) as writer:
        for split, data in splits.items():
            items = data.items() if isinstance(data, Mapping) else ((c, data.get_client(c)) for c in data.client_ids)
            writer.add_many(items, split)
    return os.fspath(path)
