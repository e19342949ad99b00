"""Split centralized arrays into clients: IID, Dirichlet label skew, shards, natural keys, sized.

Every partitioner is seeded and deterministic and returns a ``Partition``:
example indices per client, which ``.apply(arrays)`` turns into an
``InMemoryFederatedData`` and ``.summary(labels)`` describes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedtrain.data.federated_data import InMemoryFederatedData, num_examples_of


class Partition:
    """Client id -> example indices into the centralized arrays."""

    def __init__(self, indices: Mapping[str, np.ndarray]):
        self.indices = {str(k): np.asarray(v, np.int64) for k, v in indices.items()}

    @property
    def client_ids(self) -> list[str]:
        return list(self.indices)

    @property
    def num_clients(self) -> int:
        return len(self.indices)

    def sizes(self) -> np.ndarray:
        return np.array([len(v) for v in self.indices.values()], np.int64)

    def apply(self, arrays: Mapping[str, np.ndarray]) -> InMemoryFederatedData:
        """Clients ``{feature: arrays[feature][indices]}``."""
        n = num_examples_of(arrays, where="arrays")
        top = max((int(v.max()) for v in self.indices.values() if len(v)), default=-1)
        if top >= n:
            raise ValueError(f"the partition indexes example {top} but the arrays have {n} examples.")
        clients = {cid: {k: np.asarray(v)[idx] for k, v in arrays.items()} for cid, idx in self.indices.items()}
        return InMemoryFederatedData(clients, _sizes={c: len(i) for c, i in self.indices.items()}, _validated=True)

    def summary(self, labels: np.ndarray | None = None, num_classes: int | None = None) -> dict:
        """``{num_clients, num_examples, sizes, size_quantiles, label_histogram [clients, classes]}``."""
        sizes = self.sizes()
        q = [0, 10, 25, 50, 75, 90, 100]
        out = {"num_clients": self.num_clients, "num_examples": int(sizes.sum()), "sizes": sizes,
               "size_quantiles": dict(zip(q, np.percentile(sizes, q).tolist())) if len(sizes) else {}}
        if labels is not None:
            labels = np.asarray(labels)
            k = int(num_classes or labels.max() + 1)
            out["label_histogram"] = np.stack([np.bincount(labels[i], minlength=k) for i in self.indices.values()]) \
                if self.indices else np.zeros((0, k), np.int64)
        return out

    def format_summary(self, labels: np.ndarray | None = None, max_rows: int = 10) -> str:
        """A short printable table of ``summary``."""
        s = self.summary(labels)
        lines = [f"clients={s['num_clients']} examples={s['num_examples']} size quantiles "
                 + " ".join(f"p{q}={v:g}" for q, v in s["size_quantiles"].items())]
        for i, cid in enumerate(self.client_ids[:max_rows]):
            hist = "" if labels is None else "  labels " + " ".join(map(str, s["label_histogram"][i]))
            lines.append(f"  {cid}: {len(self.indices[cid])}{hist}")
        if self.num_clients > max_rows:
            lines.append(f"  ... {self.num_clients - max_rows} more")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Partition(num_clients={self.num_clients}, num_examples={int(self.sizes().sum())})"


def _ids(num_clients: int, prefix: str) -> list[str]:
    width = len(str(max(num_clients - 1, 0)))
    return [f"{prefix}{i:0{width}d}" for i in range(num_clients)]


def _check(num_examples: int, num_clients: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}.")
    if num_clients > num_examples:
        raise ValueError(f"asked for {num_clients} clients but there are only {num_examples} examples; "
                         "use at most that many clients so none is empty.")


def iid(num_examples: int, num_clients: int, *, seed: int = 0, prefix: str = "client_") -> Partition:
    """Shuffle and deal examples into ``num_clients`` clients of (near) equal size."""
    _check(num_examples, num_clients)
    perm = np.random.default_rng(seed).permutation(num_examples)
    return Partition(dict(zip(_ids(num_clients, prefix), np.array_split(perm, num_clients))))


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, *, seed: int = 0, min_size: int = 1,
              prefix: str = "client_", max_tries: int = 100) -> Partition:
    """Label skew (Hsu et al. 2019): each class is split over clients by proportions ~ Dir(alpha).

    Redraws (up to ``max_tries``) until every client has at least ``min_size`` examples.
    """
    labels = np.asarray(labels)
    _check(len(labels), num_clients)
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}.")
    if min_size * num_clients > len(labels):
        raise ValueError(f"min_size={min_size} x {num_clients} clients exceeds the {len(labels)} examples.")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            p = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
            for i, chunk in enumerate(np.split(idx, cuts)):
                parts[i].append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(o) for o in out) >= min_size:
            return Partition(dict(zip(_ids(num_clients, prefix), out)))
    raise ValueError(f"no Dirichlet(alpha={alpha}) draw gave every client >= {min_size} examples in {max_tries} "
                     "tries; raise alpha, lower min_size or use fewer clients.")


def shards(labels: np.ndarray, num_clients: int, shards_per_client: int = 2, *, seed: int = 0,
           prefix: str = "client_") -> Partition:
    """Pathological non-IID (McMahan et al. 2017): sort by label, cut into equal shards, deal
    ``shards_per_client`` random shards to each client (MNIST: 100 clients x 2 shards of 300)."""
    labels = np.asarray(labels)
    num_shards = num_clients * shards_per_client
    _check(len(labels), num_shards)
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.permutation(len(labels)), labels))  # by label, random within a label
    pieces = np.array_split(order, num_shards)
    deal = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return Partition({cid: np.sort(np.concatenate([pieces[s] for s in row]))
                      for cid, row in zip(_ids(num_clients, prefix), deal)})


def by_key(keys: Sequence) -> Partition:
    """One client per distinct natural key (writer, user, speaker), in sorted key order."""
    keys = np.asarray(keys)
    if keys.ndim != 1 or len(keys) == 0:
        raise ValueError("keys must be a non-empty 1-d array with one key per example.")
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
    ends = np.r_[starts[1:], len(keys)]
    return Partition({str(sk[s]): order[s:e] for s, e in zip(starts, ends)})


def client_sizes(num_examples: int, num_clients: int, distribution: str = "lognormal", *, seed: int = 0,
                 sigma: float = 1.0, exponent: float = 1.5, min_size: int = 1) -> np.ndarray:
    """Heavy-tailed client sizes summing to ``num_examples``: ``'lognormal'`` (sigma), ``'powerlaw'``
    (Pareto ``exponent``) or ``'equal'``; every client gets at least ``min_size``."""
    _check(num_examples, num_clients)
    if min_size * num_clients > num_examples:
        raise ValueError(f"min_size={min_size} x {num_clients} clients exceeds the {num_examples} examples.")
    rng = np.random.default_rng(seed)
    if distribution == "lognormal":
        w = rng.lognormal(0.0, sigma, num_clients)
    elif distribution == "powerlaw":
        w = rng.pareto(exponent, num_clients) + 1.0
    elif distribution == "equal":
        w = np.ones(num_clients)
    else:
        raise ValueError(f"unknown distribution {distribution!r}; use 'lognormal', 'powerlaw' or 'equal'.")
    spare = num_examples - min_size * num_clients
    raw = w / w.sum() * spare
    sizes = np.floor(raw).astype(np.int64)
    short = spare - int(sizes.sum())
    sizes[np.argsort(raw - sizes)[::-1][:short]] += 1  # largest remainders
    return sizes + min_size


def sized(num_examples: int, num_clients: int, distribution: str = "lognormal", *, seed: int = 0,
          prefix: str = "client_", **kwargs) -> Partition:
    """IID examples, client sizes drawn from ``distribution`` (see ``client_sizes``)."""
    sizes = client_sizes(num_examples, num_clients, distribution, seed=seed, **kwargs)
    perm = np.random.default_rng(seed + 1).permutation(num_examples)
    return Partition(dict(zip(_ids(num_clients, prefix), np.split(perm, np.cumsum(sizes)[:-1]))))


PARTITIONERS = {"iid": iid, "dirichlet": dirichlet, "shards": shards, "by_key": by_key, "sized": sized}
