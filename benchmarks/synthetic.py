"""Synthetic federated data with the real tasks' shapes, from a seed, with numpy only.

Imported both by the fedtrain side (benchmarks/suite.py) and by the FedJAX side
(benchmarks/fedjax_baseline.py, in its own virtualenv), so both train on the
same arrays. Every generator returns ``{client_id: {"x": ..., "y": ...}}``
with client ids in population order.

  emnist         28x28x1 float images in [0, 1), 62 classes; sizes uniform in
                 [mean/2, 3*mean/2] (same stream as round_throughput.synthetic_emnist).
  stackoverflow  20-token sentences: x = BOS w1 .. , y = w1 .. EOS, PAD-filled; word ids
                 Zipf-distributed over the 10,000-word vocabulary (OOV id 10,003 for the
                 tail, ~5 %); client sizes heavy-tailed (log-normal, capped at 1,000 sentences).
  cifar100       24x24x3 float images (the 24x24 crop), 100 classes, 100 per client.
"""

from __future__ import annotations

import numpy as np

PAD, BOS, EOS = 0, 1, 2


def emnist(num_clients: int = 500, mean_size: int = 194, num_classes: int = 62, seed: int = 0) -> dict:
    """EMNIST-shaped clients (``x [n, 28, 28, 1] float32``, ``y [n] int32``)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(mean_size // 2, 3 * mean_size // 2 + 1, num_clients)
    return {f"writer_{i:04d}": {"x": rng.random((n, 28, 28, 1), np.float32),
                                "y": rng.integers(0, num_classes, n).astype(np.int32)}
            for i, n in enumerate(sizes)}


def stackoverflow_sizes(num_clients: int, median: float = 80.0, sigma: float = 1.4, max_size: int = 1000,
                        seed: int = 0) -> np.ndarray:
    """Heavy-tailed sentences per client: ``round(lognormal(log median, sigma))`` clipped to [1, max_size]."""
    rng = np.random.default_rng([seed, 1])
    return np.clip(np.round(rng.lognormal(np.log(median), sigma, num_clients)), 1, max_size).astype(np.int64)


def stackoverflow(num_clients: int = 2000, vocab_size: int = 10_000, sequence_length: int = 20,
                  median_size: float = 80.0, max_size: int = 1000, seed: int = 0) -> dict:
    """Stack Overflow-shaped clients (``x``, ``y`` ``[n, sequence_length] int32``).

    Sentence lengths (words before EOS) are ``1 + Poisson(12)``, truncated so
    that ``BOS + words`` fits ``sequence_length`` (longer sentences lose EOS).
    Word ``k`` (Zipf rank, exponent 1.3; ~5 % OOV) has id ``k + 2``; ranks above
    ``vocab_size`` map to the OOV id ``vocab_size + 3``.
    """
    sizes = stackoverflow_sizes(num_clients, median_size, max_size=max_size, seed=seed)
    rng = np.random.default_rng([seed, 2])
    total = int(sizes.sum())
    t = sequence_length
    words = rng.zipf(1.3, (total, t)).astype(np.int64)
    words = np.where(words > vocab_size, vocab_size + 3, words + 2).astype(np.int32)
    lengths = np.minimum(1 + rng.poisson(12, total), t)  # words per sentence, EOS after them if it fits
    stream = np.concatenate([np.full((total, 1), BOS, np.int32), words], axis=1)  # [BOS, w1, .., wT]
    pos = np.arange(t + 1)[None, :]
    stream = np.where(pos <= lengths[:, None], stream, PAD)
    stream = np.where(pos == lengths[:, None] + 1, EOS, stream).astype(np.int32)
    x, y = stream[:, :t], stream[:, 1:]
    x = np.where(x == EOS, PAD, x)  # EOS is only ever a target
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    return {f"so_{i:06d}": {"x": x[offsets[i]:offsets[i + 1]], "y": y[offsets[i]:offsets[i + 1]]}
            for i in range(num_clients)}


def cifar100(num_clients: int = 500, size: int = 100, image_size: int = 24, num_classes: int = 100,
             seed: int = 0) -> dict:
    """CIFAR-100-shaped clients (``x [size, image_size, image_size, 3] float32``, ``y [size] int32``)."""
    rng = np.random.default_rng([seed, 3])
    return {f"cifar_{i:03d}": {"x": rng.random((size, image_size, image_size, 3), np.float32),
                               "y": rng.integers(0, num_classes, size).astype(np.int32)}
            for i in range(num_clients)}


GENERATORS = {"emnist": emnist, "stackoverflow": stackoverflow, "cifar100": cifar100}


def generate(name: str, **kwargs) -> dict:
    """``GENERATORS[name](**kwargs)``."""
    if name not in GENERATORS:
        raise ValueError(f"unknown synthetic data {name!r}; choose from {sorted(GENERATORS)}")
    return GENERATORS[name](**kwargs)


def save_npz(path: str, clients: dict) -> None:
    """Writes clients as one array per feature plus ``offsets`` and ``client_ids``."""
    ids = list(clients)
    sizes = [len(next(iter(clients[c].values()))) for c in ids]
    keys = sorted(clients[ids[0]])
    arrays = {f"feature_{k}": np.concatenate([clients[c][k] for c in ids]) for k in keys}
    np.savez(path, client_ids=np.array(ids), offsets=np.concatenate([[0], np.cumsum(sizes)]), **arrays)


def load_npz(path: str) -> dict:
    """Inverse of :func:`save_npz`."""
    with np.load(path) as f:
        ids, offsets = [str(c) for c in f["client_ids"]], f["offsets"]
        feats = {k[len("feature_"):]: f[k] for k in f.files if k.startswith("feature_")}
    return {c: {k: v[offsets[i]:offsets[i + 1]] for k, v in feats.items()} for i, c in enumerate(ids)}


def fingerprint(clients: dict) -> str:
    """A short hash of all client ids and arrays (to check both sides hold the same data)."""
    import hashlib
    h = hashlib.sha256()
    for c in clients:
        h.update(str(c).encode())
        for k in sorted(clients[c]):
            h.update(k.encode())
            h.update(np.ascontiguousarray(clients[c][k]).tobytes())
    return h.hexdigest()[:16]
