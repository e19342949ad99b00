"""Synthetic federated data with the standard datasets' shapes and heavy-tailed client sizes.

Clients are generated on the fly from ``(seed, client index)``, so a
342k-client population costs only its size table in memory.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

import numpy as np

from fedtrain.data.federated_data import ClientId, Examples, UnknownClientError

# name -> (shape, dtype, high): integers uniform in [0, high), floats uniform in [0, 1).
Spec = Mapping[str, tuple[tuple[int, ...], str, int]]

PRESETS = {
    "emnist": dict(num_clients=3400, mean_size=198, sigma=0.6,
                   features={"pixels": ((28, 28), "float32", 0), "label": ((), "int32", 62)}),
    "emnist_digits": dict(num_clients=3383, mean_size=101, sigma=0.6,
                          features={"pixels": ((28, 28), "float32", 0), "label": ((), "int32", 10)}),
    "stackoverflow": dict(num_clients=342_477, mean_size=397, sigma=1.6,
                          features={"x": ((20,), "int32", 10_004), "y": ((20,), "int32", 10_004),
                                    "domain_id": ((), "int32", 2)}),
    "cifar100": dict(num_clients=500, mean_size=100, sigma=0.0,
                     features={"image": ((32, 32, 3), "uint8", 256), "label": ((), "int64", 100),
                               "coarse_label": ((), "int64", 20)}),
}


class SyntheticFederatedData:
    """Seeded random clients: sizes ~ log-normal(mean ``mean_size``, ``sigma``), features per ``features``."""

    def __init__(self, num_clients: int, features: Spec, *, mean_size: float = 100, sigma: float = 1.0,
                 min_size: int = 1, seed: int = 0, prefix: str = "synthetic_"):
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}.")
        rng = np.random.default_rng(seed)
        raw = rng.lognormal(-0.5 * sigma**2, sigma, num_clients) * mean_size
        self._sizes = np.maximum(np.round(raw), min_size).astype(np.int64)
        width = len(str(num_clients - 1))
        self._ids = [f"{prefix}{i:0{width}d}" for i in range(num_clients)]
        self._index = {c: i for i, c in enumerate(self._ids)}
        self._features = dict(features)
        self._seed = seed
        self._preprocess = None
        self._view = None

    @classmethod
    def like(cls, name: str, *, seed: int = 0, **overrides) -> "SyntheticFederatedData":
        """A preset shaped like a real dataset: ``'emnist'``, ``'emnist_digits'``, ``'stackoverflow'``, ``'cifar100'``."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; use one of {sorted(PRESETS)}.")
        kwargs = {**PRESETS[name], **overrides}
        return cls(kwargs.pop("num_clients"), kwargs.pop("features"), seed=seed, prefix=f"{name}_", **kwargs)

    @property
    def client_ids(self) -> list[ClientId]:
        return list(self._ids) if self._view is None else list(self._view)

    @property
    def num_clients(self) -> int:
        return len(self._ids) if self._view is None else len(self._view)

    def _i(self, client_id: ClientId) -> int:
        i = self._index.get(client_id)
        if i is None or (self._view is not None and client_id not in self._view_set):
            raise UnknownClientError(f"unknown client id {client_id!r}; ids look like {self.client_ids[:2]}.")
        return i

    def client_size(self, client_id: ClientId) -> int:
        return int(self._sizes[self._i(client_id)])

    def client_sizes(self) -> np.ndarray:
        return self._sizes.copy() if self._view is None else self._sizes[[self._index[c] for c in self._view]]

    def get_client(self, client_id: ClientId) -> Examples:
        i = self._i(client_id)
        n = int(self._sizes[i])
        rng = np.random.default_rng([self._seed, i])
        out = {}
        for name, (shape, dtype, high) in self._features.items():
            if np.issubdtype(np.dtype(dtype), np.floating):
                out[name] = rng.random((n, *shape), dtype=np.float32).astype(dtype)
            else:
                out[name] = rng.integers(0, high, (n, *shape)).astype(dtype)
        return out if self._preprocess is None else self._preprocess(out)

    def preprocess(self, fn) -> "SyntheticFederatedData":
        view = copy.copy(self)
        inner = self._preprocess
        view._preprocess = fn if inner is None else (lambda ex: fn(inner(ex)))
        return view

    def subset(self, client_ids: Iterable[ClientId]) -> "SyntheticFederatedData":
        ids = [str(c) for c in client_ids]
        for c in ids:
            self._i(c)
        view = copy.copy(self)
        view._view, view._view_set = ids, set(ids)
        return view

    def __repr__(self) -> str:
        return f"SyntheticFederatedData(num_clients={self.num_clients})"
