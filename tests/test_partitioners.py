"""Partitioners: determinism, coverage, the skew each promises, summaries, bad requests."""

import numpy as np
import pytest

from fedtrain.data import partitioners as P

LABELS = np.repeat(np.arange(10), 60)  # 600 examples, 10 classes


def covers_all(part, n):
    allidx = np.concatenate(list(part.indices.values()))
    return np.array_equal(np.sort(allidx), np.arange(n))


@pytest.mark.parametrize("make", [
    lambda s: P.iid(600, 20, seed=s),
    lambda s: P.dirichlet(LABELS, 20, 0.3, seed=s),
    lambda s: P.shards(LABELS, 20, 2, seed=s),
    lambda s: P.sized(600, 20, "lognormal", seed=s),
    lambda s: P.sized(600, 20, "powerlaw", seed=s),
])
def test_seeded_deterministic_and_covering(make):
    a, b, c = make(0), make(0), make(1)
    assert a.client_ids == b.client_ids and all(np.array_equal(a.indices[k], b.indices[k]) for k in a.indices)
    assert any(not np.array_equal(a.indices[k], c.indices[k]) for k in a.indices)
    assert covers_all(a, 600) and a.num_clients == 20 and a.sizes().min() >= 1


def test_skews():
    hist = P.shards(LABELS, 20, 2, seed=0).summary(LABELS)["label_histogram"]
    assert ((hist > 0).sum(1) <= 2).all() and (hist.sum(1) == 30).all()
    low = P.dirichlet(LABELS, 20, 0.05, seed=0).summary(LABELS)["label_histogram"]
    high = P.dirichlet(LABELS, 20, 1000.0, seed=0).summary(LABELS)["label_histogram"]
    assert (low > 0).sum(1).mean() < (high > 0).sum(1).mean()
    assert set(P.iid(600, 7).sizes()) <= {85, 86}
    sizes = P.client_sizes(100_000, 1000, "powerlaw", seed=0)
    assert sizes.sum() == 100_000 and sizes.max() > 10 * np.median(sizes)
    assert P.client_sizes(10, 3, "equal").tolist() == [4, 3, 3] or sorted(P.client_sizes(10, 3, "equal")) == [3, 3, 4]


def test_by_key_and_apply():
    keys = np.array(["w2", "w1", "w2", "w3", "w1"])
    part = P.by_key(keys)
    assert part.client_ids == ["w1", "w2", "w3"] and part.indices["w2"].tolist() == [0, 2]
    data = part.apply({"x": np.arange(5) * 10, "y": np.arange(5)})
    assert data.get_client("w1")["x"].tolist() == [10, 40] and data.client_size("w3") == 1
    s = part.summary(np.array([0, 1, 0, 1, 1]))
    assert s["num_clients"] == 3 and s["label_histogram"].tolist() == [[0, 2], [2, 0], [0, 1]]
    assert "clients=3 examples=5" in part.format_summary(np.array([0, 1, 0, 1, 1]))
    with pytest.raises(ValueError, match="indexes example 4 but the arrays have 3"):
        part.apply({"x": np.arange(3)})


def test_bad_requests():
    with pytest.raises(ValueError, match="asked for 700 clients but there are only 600 examples"):
        P.iid(600, 700)
    with pytest.raises(ValueError, match="only 600 examples"):
        P.shards(LABELS, 400, 2)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        P.dirichlet(LABELS, 5, 0.0)
    with pytest.raises(ValueError, match="unknown distribution"):
        P.sized(600, 5, "zipfy")
    with pytest.raises(ValueError, match="min_size=50 x 20 clients exceeds"):
        P.sized(600, 20, min_size=50)
