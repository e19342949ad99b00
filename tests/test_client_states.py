"""Stateful clients: the engine gathers the cohort's rows and scatters new ones back."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import fedtrain
from fedtrain.client_states import ClientStateStore
from tests.conftest import TinyMLP


def counting_fedavg():
    """FedAvg whose clients remember how often they trained and on how many examples."""
    base = fedtrain.algorithms.fedavg(optax.sgd(0.1))

    def client_init(model, broadcast, state, rng):
        return base.client_init(model, broadcast, None, rng), state

    def client_step(model, local, batch):
        inner, sums = base.client_step(model, local[0], batch)
        return (inner, local[1]), sums

    def client_final(model, broadcast, local, num_examples):
        out = base.client_final(model, broadcast, local[0], num_examples)
        state = {"rounds": local[1]["rounds"] + 1, "examples": local[1]["examples"] + num_examples}
        return out._replace(client_state=state)

    return base._replace(name="counting", client_init=client_init, client_step=client_step,
                         client_final=client_final,
                         client_state_init=lambda params: {"rounds": jnp.zeros((), jnp.int32),
                                                           "examples": jnp.zeros((), jnp.float32)})


@pytest.mark.parametrize("backend", ["scan", "vmap", "debug"])
def test_client_states_persist_across_rounds(data, backend):
    cohorts = []
    trainer = fedtrain.FederatedTrainer(TinyMLP(rngs=nnx.Rngs(0)), data, counting_fedavg(), backend=backend,
                                        lanes=2 if backend == "vmap" else None)
    trainer.fit(rounds=6, clients_per_round=4, batch_size=4, verbose=0,
                callbacks=[fedtrain.callbacks.LambdaCallback(on_clients_sampled=lambda r, ids: cohorts.append(ids))])
    store = trainer.client_states
    for cid in data.client_ids:
        times = sum(cid in c for c in cohorts)
        state = store.get(cid)
        assert int(state["rounds"]) == times
        assert float(state["examples"]) == times * data.client_size(cid)
    assert len(store) == len({c for cohort in cohorts for c in cohort})


def test_store_gather_scatter_roundtrip_and_shape_check():
    store = ClientStateStore({"c": np.zeros((2,), np.float32)})
    placement = [(0, 1), (1, 0)]
    rows = store.gather(["a", "b"], placement, lanes=2, slots=2)
    assert rows["c"].shape == (2, 2, 2)
    rows["c"][0, 1] = [1, 2]
    rows["c"][1, 0] = [3, 4]
    store.scatter(["a", "b"], placement, rows)
    np.testing.assert_array_equal(store.get("a")["c"], [1, 2])
    np.testing.assert_array_equal(store.gather(["b"], [(0, 0)], 1, 1)["c"][0, 0], [3, 4])
    np.testing.assert_array_equal(store.get("never")["c"], [0, 0])
    with pytest.raises(ValueError, match="client state of 'x' does not match"):
        store.load_state_dict({"x": [np.zeros(3)]})
