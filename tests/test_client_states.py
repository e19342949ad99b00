"""Stateful clients: the engine gathers the cohort's rows and scatters new ones back."""

import jax
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

    def client_init(broadcast, state, prepass, ctx):
        return base.client_init(broadcast, None, prepass, ctx), state

    def client_step(local, batch, ctx):
        inner, sums = base.client_step(local[0], batch, ctx)
        return (inner, local[1]), sums

    def client_final(broadcast, local, ctx):
        out = base.client_final(broadcast, local[0], ctx)
        state = {"rounds": local[1]["rounds"] + 1, "examples": local[1]["examples"] + ctx.num_examples}
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


# ---------------------------------------------------------------------- device-resident client states
def tree_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def scaffold_trainer(data, placement, backend="scan", **kwargs):
    return fedtrain.FederatedTrainer(TinyMLP(rngs=nnx.Rngs(0)), data, fedtrain.algorithms.scaffold(0.1),
                                     backend=backend, lanes=2 if backend == "vmap" else None, seed=1,
                                     client_state_placement=placement, **kwargs)


@pytest.mark.parametrize("backend", ["scan", "vmap", "debug"])
def test_device_and_host_modes_train_scaffold_identically(data, backend):
    trainers = {p: scaffold_trainer(data, p, backend) for p in ("device", "host")}
    for t in trainers.values():
        t.fit(rounds=5, clients_per_round=4, batch_size=4, verbose=0)  # 12 clients: partial participation
    dev, host = trainers["device"], trainers["host"]
    assert dev.client_states.placement == "device" and host.client_states.placement == "host"
    assert tree_equal(dev.server_state, host.server_state)
    rows_dev, rows_host = dev.client_states.state_dict(), host.client_states.state_dict()
    assert rows_dev.keys() == rows_host.keys() and 4 < len(rows_dev) <= 12
    assert tree_equal(rows_dev, rows_host)
    assert len(dev.client_states) == len(host.client_states) == len(rows_dev)
    for cid in data.client_ids:
        assert (cid in dev.client_states) == (cid in host.client_states)
        assert tree_equal(dev.client_states.get(cid), host.client_states.get(cid))


def test_device_store_gather_scatter_roundtrip():
    store = ClientStateStore({"c": np.zeros((2,), np.float32), "n": np.ones((), np.int32)}, placement="device")
    store.bind(["a", "b", "c"])
    assert store.placement == "device" and len(store) == 0 and "a" not in store
    placement = [(0, 1), (1, 0)]
    rows = store.gather(["a", "b"], placement, lanes=2, slots=2)
    assert isinstance(rows["c"], jax.Array) and rows["c"].shape == (2, 2, 2) and rows["n"].shape == (2, 2)
    np.testing.assert_array_equal(rows["n"], 1)  # every slot, empty ones included, reads the initial state
    new = {"c": jnp.arange(8, dtype=jnp.float32).reshape(2, 2, 2), "n": jnp.full((2, 2), 7, jnp.int32)}
    store.scatter(["a", "b"], placement, new)
    np.testing.assert_array_equal(store.get("a")["c"], [2, 3])
    np.testing.assert_array_equal(store.get("b")["c"], [4, 5])
    np.testing.assert_array_equal(store.get("c")["c"], [0, 0])  # empty slots were dropped, not written
    np.testing.assert_array_equal(store.get("never")["c"], [0, 0])
    assert len(store) == 2 and "a" in store and "c" not in store
    again = store.gather(["b", "a"], [(0, 0), (0, 1)], lanes=1, slots=3)
    np.testing.assert_array_equal(again["c"][0], [[4, 5], [2, 3], [0, 0]])
    # a client outside the bound population grows the table; a repeated client keeps its last state
    store.scatter(["z", "z"], [(0, 0), (0, 1)], {"c": jnp.array([[[1, 1], [9, 9]]], jnp.float32),
                                                  "n": jnp.zeros((1, 2), jnp.int32)})
    np.testing.assert_array_equal(store.get("z")["c"], [9, 9])
    np.testing.assert_array_equal(store.get("a")["c"], [2, 3])
    assert list(store.state_dict()) == ["a", "b", "z"]
    # loading replaces everything: clients missing from the rows are back at the initial state
    store.load_state_dict({"b": [np.full(2, 5.0), np.array(3)]})
    assert list(store.state_dict()) == ["b"] and "a" not in store
    np.testing.assert_array_equal(store.get("a")["c"], [0, 0])
    np.testing.assert_array_equal(store.gather(["b"], [(0, 0)], 1, 1)["n"], [[3]])


@pytest.mark.parametrize("placement", ["device", "host", "auto"])
def test_wrong_shapes_on_load_raise(placement):
    store = ClientStateStore({"c": np.zeros((2,), np.float32)}, placement=placement)
    store.bind(["a", "b"])
    store.load_state_dict({"a": [np.ones(2)]})
    for bad in ({"x": [np.zeros(3)]}, {"x": [np.zeros(2), np.zeros(2)]}, {"x": []}):
        with pytest.raises(ValueError, match="client state of 'x' does not match"):
            store.load_state_dict(bad)
    np.testing.assert_array_equal(store.get("a")["c"], [1, 1])  # a refused load changes nothing


def test_auto_picks_device_when_it_fits_and_host_otherwise(data, monkeypatch):
    init = {"c": np.zeros((4,), np.float32)}  # 16 bytes a row
    small = ClientStateStore(init, placement="auto")
    small.bind([f"c{i}" for i in range(100)])
    assert small.placement == "device"
    tiny_budget = ClientStateStore(init, placement="auto", memory_budget=16 * 99)
    tiny_budget.bind([f"c{i}" for i in range(100)])
    assert tiny_budget.placement == "host"
    assert ClientStateStore(init).placement == "host"  # the store's default
    with pytest.raises(ValueError, match="placement must be one of"):
        ClientStateStore(init, placement="gpu")
    # "device" that does not fit names the size and the fix
    forced = ClientStateStore(init, placement="device", memory_budget=16 * 99)
    with pytest.raises(ValueError, match=r"100 clients needs 1\.6 KiB .*client_state_placement='host'"):
        forced.bind([f"c{i}" for i in range(100)])
    # "auto" that outgrows the budget later moves its rows to the host
    growing = ClientStateStore(init, placement="auto", memory_budget=16 * 3)
    growing.bind(["a", "b"])
    growing.scatter(["a"], [(0, 0)], {"c": jnp.ones((1, 1, 4))})
    assert growing.placement == "device"
    growing.scatter(["b", "x", "y"], [(0, 0), (0, 1), (0, 2)], {"c": jnp.full((1, 3, 4), 2.0)})
    assert growing.placement == "host" and list(growing.state_dict()) == ["a", "b", "x", "y"]
    np.testing.assert_array_equal(growing.get("a")["c"], 1)
    np.testing.assert_array_equal(growing.get("y")["c"], 2)
    # the trainer: the budget comes from the device (a quarter of its limit; 1 GiB on CPU)
    assert fedtrain.client_states.device_memory_budget(jax.devices("cpu")[0]) == 1 << 30
    trainer = scaffold_trainer(data, "auto")
    trainer.fit(rounds=1, clients_per_round=4, batch_size=4, verbose=0)
    assert trainer.client_states.placement == "device"
    monkeypatch.setattr(fedtrain.client_states, "device_memory_budget", lambda device=None: 1000)
    trainer = scaffold_trainer(data, "auto")
    trainer.fit(rounds=1, clients_per_round=4, batch_size=4, verbose=0)
    assert trainer.client_states.placement == "host"


@pytest.mark.parametrize("write,read", [("device", "host"), ("host", "device"), ("device", "auto")])
def test_checkpoints_restore_across_placements(data, tmp_path, write, read):
    from fedtrain.callbacks import OrbaxCheckpoint

    fit = dict(clients_per_round=4, batch_size=4, verbose=0)
    straight = scaffold_trainer(data, "host")
    straight.fit(rounds=5, **fit)
    first = scaffold_trainer(data, write)
    first.fit(rounds=3, **fit, callbacks=[OrbaxCheckpoint(tmp_path)])
    assert first.client_states.placement == write
    # explicit restore before fit (the table has no population yet)
    other = scaffold_trainer(data, read)
    assert other.restore(tmp_path) == 3
    assert other.client_states.state_dict().keys() == first.client_states.state_dict().keys()
    assert tree_equal(other.client_states.state_dict(), first.client_states.state_dict())
    other.fit(rounds=5, **fit)
    assert other.client_states.placement == ("device" if read == "auto" else read)
    assert tree_equal(other.server_state, straight.server_state)
    assert tree_equal(other.client_states.state_dict(), straight.client_states.state_dict())
    # implicit resume inside fit (the callback restores in on_train_begin, after the population is bound)
    resumed = scaffold_trainer(data, read)
    resumed.fit(rounds=5, **fit, callbacks=[OrbaxCheckpoint(tmp_path, max_to_keep=None)])
    assert resumed.history.rounds == [0, 1, 2, 3, 4]
    assert tree_equal(resumed.server_state, straight.server_state)
    assert tree_equal(resumed.client_states.state_dict(), straight.client_states.state_dict())
