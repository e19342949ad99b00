"""Shared fixtures: a tiny model and small heterogeneous federated datasets."""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np
import pytest
from flax import nnx

import fedtrain


class TinyMLP(nnx.Module):
    def __init__(self, features=8, hidden=16, classes=3, dropout=0.0, *, rngs):
        self.l1 = nnx.Linear(features, hidden, rngs=rngs)
        self.l2 = nnx.Linear(hidden, classes, rngs=rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs) if dropout else None

    def __call__(self, x):
        h = nnx.relu(self.l1(x))
        if self.drop is not None:
            h = self.drop(h)
        return self.l2(h)


class Linear(nnx.Module):
    """Softmax regression: logits = x @ W + b."""

    def __init__(self, features=4, classes=3, *, rngs):
        self.dense = nnx.Linear(features, classes, rngs=rngs)

    def __call__(self, x):
        return self.dense(x)


def make_clients(num_clients=12, features=8, classes=3, min_size=3, max_size=40, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(features, classes))
    clients = {}
    for i in range(num_clients):
        n = int(rng.integers(min_size, max_size + 1))
        x = rng.normal(size=(n, features)).astype(np.float32)
        y = np.argmax(x @ w + 0.3 * rng.normal(size=(n, classes)), -1).astype(np.int32)
        clients[f"client_{i:03d}"] = {"x": x, "y": y}
    return clients


@pytest.fixture
def clients():
    return make_clients()


@pytest.fixture
def data(clients):
    return fedtrain.InMemoryFederatedData(clients)
