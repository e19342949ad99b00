"""Shared fixtures: a tiny model and small heterogeneous federated datasets."""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
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


def run_engine_round(clients, cohort, algorithm, *, lanes=1, extra_capacity=0, empty=None):
    """One compiled round of ``algorithm`` on ``cohort`` (ids of ``clients``; an unknown id is the
    client ``empty``), batch 4, lanes of room for the largest clients plus ``extra_capacity`` steps.
    The population is ``clients`` (so SCAFFOLD's N is the same whatever the cohort).
    Returns ``(initial_server_state, RoundResult)``."""
    from fedtrain.client_states import ClientStateStore
    from fedtrain.engine import Population
    from fedtrain.engine.plan import BatchSpec, Layout, build_round, feature_specs, prepass_steps

    data = fedtrain.InMemoryFederatedData({**clients, **{c: empty for c in cohort if c not in clients}})
    model = fedtrain.models.adapter.from_nnx(Linear(features=8, rngs=nnx.Rngs(0)))
    spec = BatchSpec(4)
    sizes = np.array([data.client_size(c) for c in cohort])
    steps = spec.steps(sizes)
    engine = fedtrain.engine.Engine(model, algorithm, "scan" if lanes == 1 else "vmap", lanes=lanes)
    ids = list(clients)
    all_sizes = np.array([data.client_size(c) for c in ids])
    specs = feature_specs(next(c for c in clients.values() if len(next(iter(c.values())))))
    state = algorithm.init(model.init_params)
    agg_state = algorithm.aggregator.init(model.init_params) if algorithm.aggregator.stateful else ()
    store = None
    if algorithm.client_state_init is not None:
        store = ClientStateStore(algorithm.client_state_init(model.init_params))
    engine.start(data, Population(ids, all_sizes, spec.steps(all_sizes)), spec, specs, len(cohort), 0,
                 (state, agg_state, {}), None if store is None else store.initial_state())
    slots = -(-len(cohort) // lanes)
    pre = int(np.sort(prepass_steps(sizes, 4))[::-1][:slots].sum()) + extra_capacity
    layout = Layout(lanes, slots, int(np.sort(steps)[::-1][:slots].sum()) + extra_capacity,
                    pre if algorithm.prepass is not None else 0, bucketed=lanes == 1)
    population = [ids.index(c) if c in ids else len(ids) for c in cohort]
    round_input = build_round(data, cohort, population, sizes, spec, layout, specs, seed=0, round_index=0)
    round_input = round_input._replace(arrays=jax.device_put(round_input.arrays))
    return state, engine.run(state, agg_state, {}, store, round_input)


def straight_and_resumed(make_trainer, directory, *, rounds=5, stop=3, **fit):
    """``(straight, first, resumed)``: ``make_trainer()`` fitted ``rounds`` rounds in one go; fitted ``stop``
    rounds with an ``OrbaxCheckpoint`` in ``directory``; and a fresh one resumed from it to ``rounds``."""
    from fedtrain.callbacks import OrbaxCheckpoint

    straight = make_trainer()
    straight.fit(rounds=rounds, **fit)
    first = make_trainer()
    first.fit(rounds=stop, **fit, callbacks=[OrbaxCheckpoint(directory)])
    resumed = make_trainer()
    resumed.fit(rounds=rounds, **fit, callbacks=[OrbaxCheckpoint(directory, max_to_keep=None)])
    assert resumed.history.rounds == list(range(rounds))
    return straight, first, resumed
