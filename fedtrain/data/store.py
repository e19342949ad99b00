"""Shared machinery of the on-disk stores: lazy views, sizes, atomic writers."""

from __future__ import annotations

import abc
import copy
import os
import threading
from collections.abc import Iterable, Iterator, Mapping

import numpy as np

from fedtrain.data.federated_data import ClientId, ClientPreprocess, Examples, UnknownClientError, num_examples_of


class StoreError(ValueError):
    """A store file is missing, corrupt, truncated or has the wrong schema."""


class FileStore(abc.ABC):
    """Base of a ``FederatedData`` read from a file, one client at a time.

    Subclasses fill ``_ids`` (in file order), ``_raw_sizes`` (``{id: n}``, or
    ``None`` when sizes are read lazily through ``_raw_size``) and implement
    ``_read(client_id)``. Handles (connections, files) are per thread, so views
    can be read from the trainer's feeder thread. ``preprocess`` and ``subset``
    return views sharing the same file.
    """

    format_name = "store"

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"{self.path} does not exist; check the path, or download/convert the data first.")
        self._local = threading.local()
        self._handles: list = []
        self._handles_lock = threading.Lock()
        self._ids: list[ClientId] = []
        self._members: set[ClientId] | None = None
        self._raw_sizes: dict[ClientId, int] | None = None
        self._preprocess: ClientPreprocess | None = None
        self._keeps_size = True
        self._sizes: dict[ClientId, int] = {}

    # -- per-thread handles ------------------------------------------------------------
    @abc.abstractmethod
    def _open_handle(self):
        """A new file handle for the calling thread."""

    def _handle(self):
        handle = getattr(self._local, "handle", None)
        if handle is None:
            handle = self._open_handle()
            self._local.handle = handle
            with self._handles_lock:
                self._handles.append(handle)
        return handle

    def close(self) -> None:
        """Closes every handle this store (and its views) opened."""
        with self._handles_lock:
            for handle in self._handles:
                try:
                    handle.close()
                except Exception:  # noqa: BLE001 - closing a handle from another thread may refuse
                    pass
            self._handles.clear()
        self._local = threading.local()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- subclass hooks ----------------------------------------------------------------
    @abc.abstractmethod
    def _read(self, client_id: ClientId) -> Examples:
        """One client's raw examples, read from the file."""

    def _raw_size(self, client_id: ClientId) -> int:
        return self._raw_sizes[client_id]

    # -- protocol ----------------------------------------------------------------------
    @property
    def client_ids(self) -> list[ClientId]:
        return list(self._ids)

    @property
    def num_clients(self) -> int:
        return len(self._ids)

    def __contains__(self, client_id: object) -> bool:
        if self._members is not None:
            return client_id in self._members
        return self._has(client_id)

    def _has(self, client_id) -> bool:
        if self._raw_sizes is not None:
            return client_id in self._raw_sizes
        if not hasattr(self, "_id_set"):
            self._id_set = set(self._ids)
        return client_id in self._id_set

    def _check(self, client_id: ClientId) -> None:
        if client_id not in self:
            raise UnknownClientError(
                f"unknown client id {client_id!r} in {self.path}; it has {self.num_clients} clients "
                f"(e.g. {self._ids[:3]}); list them with `.client_ids` or `fedtrain data inspect {self.path}`.")

    def get_client(self, client_id: ClientId) -> Examples:
        self._check(client_id)
        examples = self._read(client_id)
        if self._preprocess is not None:
            examples = self._preprocess(client_id, dict(examples))
        return examples

    def client_size(self, client_id: ClientId) -> int:
        self._check(client_id)
        if self._preprocess is None or self._keeps_size:
            return self._raw_size(client_id)
        size = self._sizes.get(client_id)
        if size is None:
            size = num_examples_of(self.get_client(client_id), where=f"client {client_id!r} of {self.path}")
            self._sizes[client_id] = size
        return size

    def client_sizes(self) -> np.ndarray:
        """Sizes of all clients, in ``client_ids`` order."""
        return np.array([self.client_size(c) for c in self._ids], dtype=np.int64)

    def preprocess(self, fn: ClientPreprocess, *, keeps_size: bool = False, with_client_id: bool = False) -> "FileStore":
        """A view whose clients are ``fn(get_client(id))`` (``fn(id, examples)`` if ``with_client_id``).

        ``keeps_size=True`` promises ``fn`` keeps the number of examples, so
        sizes come from the file's metadata instead of reading every client.
        """
        view = copy.copy(self)
        inner = self._preprocess
        step = fn if with_client_id else (lambda cid, ex: fn(ex))
        view._preprocess = step if inner is None else (lambda cid, ex: step(cid, inner(cid, ex)))
        view._keeps_size = self._keeps_size and keeps_size
        view._sizes = {}
        return view

    def subset(self, client_ids: Iterable[ClientId]) -> "FileStore":
        ids = [str(c) for c in client_ids]
        for cid in ids:
            self._check(cid)
        view = copy.copy(self)
        view._ids = ids
        view._members = set(ids)
        view._sizes = {c: self._sizes[c] for c in ids if c in self._sizes}
        return view

    # -- conveniences ------------------------------------------------------------------
    def __len__(self) -> int:
        return self.num_clients

    def __iter__(self) -> Iterator[ClientId]:
        return iter(list(self._ids))

    def items(self) -> Iterator[tuple[ClientId, Examples]]:
        """``(client_id, examples)`` for every client, read one at a time."""
        for cid in list(self._ids):
            yield cid, self.get_client(cid)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, num_clients={self.num_clients})"


class StoreWriter:
    """What every store writer shares: ``add_many``, and as a context manager ``close`` on
    success and ``abort`` (nothing left at the target path) on error. Subclasses define
    ``add(client_id, examples)``, ``close()`` and ``abort()``."""

    def add_many(self, items: Iterable[tuple[ClientId, Mapping[str, np.ndarray]]]) -> None:
        for cid, ex in items:
            self.add(cid, ex)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def validated(client_id: ClientId, examples: Mapping[str, np.ndarray], where: str) -> tuple[dict, int]:
    """``(arrays, num_examples)`` of a client about to be written; clear error if ragged."""
    arrays = {str(k): np.asarray(v) for k, v in examples.items()}
    return arrays, num_examples_of(arrays, where=f"client {client_id!r} written to {where}")


class AtomicFile:
    """Writes go to ``path + '.partial'``; ``commit`` renames it to ``path``, ``abort`` deletes it."""

    def __init__(self, path: str | os.PathLike, overwrite: bool = False):
        self.path = os.fspath(path)
        if os.path.exists(self.path) and not overwrite:
            raise FileExistsError(f"{self.path} already exists; delete it or pass overwrite=True (--overwrite).")
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        self.partial = self.path + ".partial"
        if os.path.exists(self.partial):
            os.remove(self.partial)

    def commit(self) -> None:
        os.replace(self.partial, self.path)

    def abort(self) -> None:
        if os.path.exists(self.partial):
            os.remove(self.partial)
