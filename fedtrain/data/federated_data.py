"""The FederatedData protocol and its in-memory implementation."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

ClientId = str
Examples = dict[str, np.ndarray]
ClientPreprocess = Callable[[Examples], Examples]


@runtime_checkable
class FederatedData(Protocol):
    """A population of clients, each holding a dict of equal-length numpy arrays.

    Stores (in-memory, SQLite, HDF5) implement this; the trainer needs nothing else.
    """

    @property
    def client_ids(self) -> Sequence[ClientId]: ...

    @property
    def num_clients(self) -> int: ...

    def client_size(self, client_id: ClientId) -> int:
        """Number of examples of one client (after preprocessing)."""
        ...

    def get_client(self, client_id: ClientId) -> Examples:
        """All examples of one client, as a dict feature -> array [N, ...]."""
        ...

    def preprocess(self, fn: ClientPreprocess) -> "FederatedData":
        """A view whose clients are ``fn(get_client(id))``."""
        ...

    def subset(self, client_ids: Iterable[ClientId]) -> "FederatedData":
        """A view restricted to the given clients (in that order)."""
        ...


class UnknownClientError(KeyError):
    """Raised when a client id is not in the dataset."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0])


def num_examples_of(examples: Mapping[str, np.ndarray], *, where: str = "client") -> int:
    """Leading dimension shared by every feature; raises a clear error if ragged."""
    if not examples:
        raise ValueError(f"{where} has no features; expected a dict like {{'x': array, 'y': array}}.")
    sizes = {name: int(np.shape(value)[0]) if np.ndim(value) else -1 for name, value in examples.items()}
    if -1 in sizes.values():
        scalars = [n for n, s in sizes.items() if s == -1]
        raise ValueError(f"{where}: features {scalars} are scalars; every feature needs a leading example axis.")
    if len(set(sizes.values())) != 1:
        raise ValueError(
            f"{where}: features have different numbers of examples {sizes}; "
            "every feature of a client must have the same leading dimension."
        )
    return next(iter(sizes.values()))


class InMemoryFederatedData:
    """Clients held in memory: ``{client_id: {feature: np.ndarray[N, ...]}}``.

    Preprocessing is applied lazily on ``get_client`` and sizes are recomputed
    from the preprocessed client, so a preprocess that changes the number of
    examples (e.g. packing text into sequences) reports correct sizes.
    """

    def __init__(
        self,
        clients: Mapping[ClientId, Mapping[str, np.ndarray]],
        *,
        preprocess: ClientPreprocess | None = None,
        _sizes: dict[ClientId, int] | None = None,
        _validated: bool = False,
    ):
        if _validated:
            self._clients = dict(clients)
        else:
            self._clients = {str(cid): {k: np.asarray(v) for k, v in ex.items()} for cid, ex in clients.items()}
            for cid, ex in self._clients.items():
                num_examples_of(ex, where=f"client {cid!r}")
        self._preprocess = preprocess
        self._sizes = dict(_sizes) if _sizes else None

    # -- protocol ---------------------------------------------------------------------
    @property
    def client_ids(self) -> list[ClientId]:
        return list(self._clients)

    @property
    def num_clients(self) -> int:
        return len(self._clients)

    def _raw(self, client_id: ClientId) -> Examples:
        try:
            return self._clients[client_id]
        except KeyError:
            raise UnknownClientError(
                f"unknown client id {client_id!r}; this dataset has {self.num_clients} clients "
                f"(e.g. {self.client_ids[:3]})."
            ) from None

    def get_client(self, client_id: ClientId) -> Examples:
        examples = self._raw(client_id)
        if self._preprocess is not None:
            examples = self._preprocess(dict(examples))
        return examples

    def client_size(self, client_id: ClientId) -> int:
        if self._sizes is None:
            self._sizes = {}
        size = self._sizes.get(client_id)
        if size is None:
            size = num_examples_of(self.get_client(client_id), where=f"client {client_id!r}")
            self._sizes[client_id] = size
        return size

    def client_sizes(self) -> np.ndarray:
        """Sizes of all clients, in ``client_ids`` order."""
        return np.array([self.client_size(cid) for cid in self.client_ids], dtype=np.int64)

    def preprocess(self, fn: ClientPreprocess) -> InMemoryFederatedData:
        inner = self._preprocess
        composed = fn if inner is None else (lambda ex: fn(inner(ex)))
        return InMemoryFederatedData(self._clients, preprocess=composed, _validated=True)

    def subset(self, client_ids: Iterable[ClientId]) -> InMemoryFederatedData:
        ids = [str(c) for c in client_ids]
        picked = {cid: self._raw(cid) for cid in ids}
        sizes = None if self._sizes is None else {c: self._sizes[c] for c in ids if c in self._sizes}
        return InMemoryFederatedData(picked, preprocess=self._preprocess, _sizes=sizes, _validated=True)

    # -- conveniences -----------------------------------------------------------------
    def __len__(self) -> int:
        return self.num_clients

    def __contains__(self, client_id: object) -> bool:
        return client_id in self._clients

    def __iter__(self) -> Iterator[ClientId]:
        return iter(self._clients)

    def items(self) -> Iterator[tuple[ClientId, Examples]]:
        for cid in self._clients:
            yield cid, self.get_client(cid)

    def __repr__(self) -> str:
        return f"InMemoryFederatedData(num_clients={self.num_clients})"


def from_arrays(arrays: Mapping[str, np.ndarray], client_of_example: np.ndarray) -> InMemoryFederatedData:
    """Builds clients from centralized arrays and a per-example client key."""
    keys = np.asarray(client_of_example)
    n = num_examples_of(arrays, where="arrays")
    if keys.shape[0] != n:
        raise ValueError(f"client_of_example has {keys.shape[0]} entries but the arrays have {n} examples.")
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    ends = np.r_[starts[1:], n]
    clients = {}
    for s, e in zip(starts, ends):
        idx = order[s:e]
        clients[str(sorted_keys[s])] = {k: np.asarray(v)[idx] for k, v in arrays.items()}
    return InMemoryFederatedData(clients)
