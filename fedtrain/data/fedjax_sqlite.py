"""FedJAX's SQLite format: one row per client, examples as ``zlib(msgpack(...))``.

Schema (``fedjax.core.sqlite_federated_data``)::

    CREATE TABLE federated_data (client_id BLOB NOT NULL PRIMARY KEY,
                                 data BLOB NOT NULL, num_examples INTEGER NOT NULL);

Client ids are bytes in the file and ``str`` here (UTF-8; other bytes survive
a round trip through ``surrogateescape``). Clients are listed in ``rowid``
order, as FedJAX does.
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
from collections.abc import Mapping

import numpy as np

from fedtrain.data.codec import CodecError, DecodedTooLarge, decode_examples, encode_examples
from fedtrain.data.federated_data import ClientId, Examples, num_examples_of
from fedtrain.data.store import AtomicFile, FileStore, StoreError, StoreWriter, validated

SCHEMA = """CREATE TABLE federated_data (
  client_id BLOB NOT NULL PRIMARY KEY,
  data BLOB NOT NULL,
  num_examples INTEGER NOT NULL
);"""


def id_to_key(client_id: ClientId) -> bytes:
    return client_id.encode("utf-8", "surrogateescape")


def key_to_id(key) -> ClientId:
    if isinstance(key, str):
        return key
    return bytes(key).decode("utf-8", "surrogateescape")


MAX_BYTES_PER_EXAMPLE = 1 << 20
"""Default cap on a client's decompressed ``data`` per example it declares (``num_examples``).

The largest official examples (a Stack Overflow post's tokens and title) take tens of KB;
1 MiB each leaves a wide margin while a crafted row cannot inflate far beyond what it declares."""
DECODE_MARGIN = 1 << 20  # bytes every client may take beyond its per-example share (msgpack headers, tiny clients)


def sqlite_uri(path: str) -> str:
    """A read-only ``file:`` URI of ``path``: every character SQLite's URI parser treats specially is escaped.

    ``%``, ``?``, ``#``, spaces and non-ASCII characters are percent-encoded, so ``pct%41/x.sqlite``
    opens that file and not ``pctA/x.sqlite``.
    """
    return "file:" + urllib.parse.quote(os.path.abspath(path), safe="/") + "?mode=ro"


def connect_readonly(path: str) -> sqlite3.Connection:
    """A read-only connection usable from the thread that opened it.

    ``FileNotFoundError`` (saying the file does not exist) when ``path`` is missing, so a missing
    file is never reported as a corrupt one.
    """
    try:
        return sqlite3.connect(sqlite_uri(path), uri=True, check_same_thread=False)
    except sqlite3.OperationalError:
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} does not exist; check the path, or download/convert the data "
                                    "first.") from None
        raise


def sqlite_tables(path: str) -> dict[str, list[str]]:
    """``{table: [column, ...]}`` of a SQLite file; ``StoreError`` if it is not one."""
    try:
        con = connect_readonly(path)
        try:
            names = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            return {n: [r[1] for r in con.execute(f'PRAGMA table_info("{n}")')] for n in names}
        finally:
            con.close()
    except sqlite3.DatabaseError as err:
        raise StoreError(f"{path} is not a readable SQLite file ({err}); it is corrupt or truncated: "
                         "download or convert it again.") from err


class FedjaxSQLiteData(FileStore):
    """A FedJAX SQLite file as ``FederatedData`` (``features -> arrays`` per client)."""

    format_name = "fedjax-sqlite"

    def __init__(self, path: str | os.PathLike, *, max_bytes_per_example: int = MAX_BYTES_PER_EXAMPLE):
        super().__init__(path)
        self.max_bytes_per_example = int(max_bytes_per_example)
        tables = sqlite_tables(self.path)
        columns = tables.get("federated_data")
        if columns is None or not {"client_id", "data", "num_examples"} <= set(columns):
            hint = (" It looks like a TFF file (tables examples/client_metadata): open it with TFFSQLiteData."
                    if "examples" in tables else "")
            raise StoreError(f"{self.path} has no table federated_data(client_id, data, num_examples) "
                             f"(tables: {sorted(tables)}); it is not a FedJAX SQLite file.{hint}")
        try:
            rows = self._handle().execute("SELECT client_id, num_examples FROM federated_data ORDER BY rowid").fetchall()
        except sqlite3.DatabaseError as err:
            raise StoreError(f"{self.path}: cannot read the client list ({err}); the file is corrupt or truncated: "
                             "download or convert it again.") from err
        bad = [(k, n) for k, n in rows if type(n) is not int or n < 0]
        if bad:
            raise StoreError(f"{self.path}: client {key_to_id(bad[0][0])!r} has num_examples {bad[0][1]!r}; it must "
                             "be a non-negative integer. The file is corrupt: download or convert it again.")
        self._ids = [key_to_id(k) for k, _ in rows]
        self._raw_sizes = {cid: int(n) for cid, (_, n) in zip(self._ids, rows)}

    def _open_handle(self):
        return connect_readonly(self.path)

    def _read(self, client_id: ClientId) -> Examples:
        key = id_to_key(client_id)
        try:
            row = self._handle().execute("SELECT data FROM federated_data WHERE client_id = ?", (key,)).fetchone()
            if row is None:  # ids written as TEXT by other tools
                row = self._handle().execute("SELECT data FROM federated_data WHERE client_id = ?",
                                             (client_id,)).fetchone()
        except sqlite3.DatabaseError as err:
            raise StoreError(f"{self.path}: reading client {client_id!r} failed ({err}); the file is corrupt or "
                             "truncated: download or convert it again.") from err
        if row is None:
            raise StoreError(f"{self.path}: client {client_id!r} is listed but has no data row.")
        declared = self._raw_sizes[client_id]
        limit = declared * self.max_bytes_per_example + DECODE_MARGIN
        try:
            examples = decode_examples(row[0], max_size=limit)
        except DecodedTooLarge as err:
            raise StoreError(f"{self.path}: client {client_id!r} declares {declared} examples but its data inflates "
                             f"to more than {limit} bytes ({self.max_bytes_per_example} per example plus "
                             f"{DECODE_MARGIN}); it was not decompressed further. The file is corrupt or crafted; "
                             "if its examples really are that large, open it with "
                             "FedjaxSQLiteData(path, max_bytes_per_example=...).") from err
        except CodecError as err:
            raise StoreError(f"{self.path}: client {client_id!r}: {err}; the file is corrupt: download or "
                             "convert it again.") from err
        n = num_examples_of(examples, where=f"client {client_id!r} of {self.path}")
        if n != self._raw_sizes[client_id]:
            raise StoreError(f"{self.path}: client {client_id!r} holds {n} examples but its num_examples column says "
                             f"{self._raw_sizes[client_id]}; the file is corrupt: download or convert it again.")
        return examples


class FedjaxSQLiteWriter(StoreWriter):
    """Writes a FedJAX SQLite file: ``add(client_id, examples)`` then ``close()`` (or use ``with``).

    The file appears under its name only once closed without error.
    """

    def __init__(self, path: str | os.PathLike, *, overwrite: bool = False):
        self._file = AtomicFile(path, overwrite)
        self.path = self._file.path
        self._con = sqlite3.connect(self._file.partial)
        self._con.execute(SCHEMA)
        self.num_clients = 0

    def add(self, client_id: ClientId, examples: Mapping[str, np.ndarray]) -> None:
        arrays, n = validated(client_id, examples, self.path)
        try:
            self._con.execute("INSERT INTO federated_data VALUES (?, ?, ?)",
                              (id_to_key(str(client_id)), encode_examples(arrays), n))
        except sqlite3.IntegrityError:
            raise ValueError(f"client id {client_id!r} is written twice to {self.path}; client ids must be unique.") from None
        self.num_clients += 1

    def close(self) -> None:
        self._con.commit()
        self._con.close()
        self._file.commit()

    def abort(self) -> None:
        self._con.close()
        self._file.abort()


def write_fedjax_sqlite(data, path: str | os.PathLike, *, overwrite: bool = False) -> str:
    """Writes every client of ``data`` (a FederatedData or ``{id: examples}``) to ``path``."""
    items = data.items() if isinstance(data, Mapping) else ((c, data.get_client(c)) for c in data.client_ids)
    with FedjaxSQLiteWriter(path, overwrite=overwrite) as writer:
        writer.add_many(items)
    return os.fspath(path)
