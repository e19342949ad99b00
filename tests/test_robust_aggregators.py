"""Robust aggregators (coordinate-wise trimmed mean and median): NumPy references, robustness to a
Byzantine client, the gather path on every backend, and validation."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import fedtrain
from fedtrain import aggregators as agg
from fedtrain.algorithms import fedavg
from tests.conftest import Linear, make_clients, run_engine_round

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gather_run(aggregator, updates, weights, padding=2, seed=0, state=None):
    """Aggregates like the engine's gather path: contributions stacked over slots (plus ``padding``
    empty slots of zeros with weight 0), sides summed, then a jitted ``finalize``."""
    key = jax.random.key(seed)
    state = aggregator.init(updates[0]) if state is None else state
    parts, total = [], None
    for i, (u, w) in enumerate(zip(updates, weights)):
        part, sides = aggregator.contribution(u, jnp.float32(w), jax.random.fold_in(key, i), state)
        parts.append(part)
        total = sides if total is None else jax.tree.map(jnp.add, total, sides)
    parts += [jax.tree.map(jnp.zeros_like, parts[0])] * padding
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *parts)
    return jax.jit(lambda s, t, st: aggregator.finalize((s, t), jax.random.fold_in(key, 999), st))(
        stacked, total, state)


def np_trimmed_mean(x, beta):
    n = x.shape[0]
    cut = int(np.floor(beta * n))
    return np.sort(x, axis=0)[cut:n - cut].mean(axis=0)


def random_updates(n, seed):
    rng = np.random.default_rng(seed)
    return [{"w": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=(3,)).astype(np.float32)}
            for _ in range(n)]


@pytest.mark.parametrize("n", [3, 4, 5, 6, 7])
def test_match_numpy_ignoring_absent_clients(n):
    ups = random_updates(n + 1, seed=n)
    weights = np.random.default_rng(100 + n).uniform(1, 20, size=n + 1).astype(np.float32)
    weights[n // 2] = 0.0  # a client with weight 0, plus two empty padded slots: neither counts
    ups[n // 2] = jax.tree.map(lambda x: x + 1e6, ups[n // 2])
    present = [u for u, w in zip(ups, weights) if w > 0]
    assert len(present) == n
    for leaf in ("w", "b"):
        x = np.stack([u[leaf] for u in present])
        out, _, metrics = gather_run(agg.median(), ups, weights)
        np.testing.assert_allclose(out[leaf], np.median(x, axis=0), rtol=1e-6, atol=1e-6)
        assert metrics == {}
        for beta in (0.0, 0.1, 0.2, 0.3, 0.49):
            out, _, metrics = gather_run(agg.trimmed_mean(beta), ups, weights)
            np.testing.assert_allclose(out[leaf], np_trimmed_mean(x, beta), rtol=1e-5, atol=1e-6)
            assert float(metrics["robust_trimmed"]) == 2 * int(np.floor(beta * n))


def test_unweighted_and_edge_cases():
    ups = [{"a": jnp.array([1.0, -2.0])}, {"a": jnp.array([3.0, 6.0])}, {"a": jnp.array([5.0, 1.0])}]
    # unweighted: the example counts do not matter, only presence
    out, _, _ = gather_run(agg.trimmed_mean(0.0), ups, [1.0, 100.0, 3.0])
    np.testing.assert_allclose(out["a"], [3.0, 5.0 / 3.0], rtol=1e-6)
    out, _, _ = gather_run(agg.median(), ups, [1.0, 100.0, 3.0])
    np.testing.assert_allclose(out["a"], [3.0, 1.0])
    out, _, _ = gather_run(agg.median(), ups[:2], [1.0, 1.0])  # even count: mean of the two middle values
    np.testing.assert_allclose(out["a"], [2.0, 2.0])
    out, _, _ = gather_run(agg.median(), ups[:1], [2.0])
    np.testing.assert_allclose(out["a"], [1.0, -2.0])
    for a in (agg.median(), agg.trimmed_mean(0.2)):  # nobody present: zero, not inf or nan
        out, _, _ = gather_run(a, ups, [0.0, 0.0, 0.0])
        np.testing.assert_array_equal(out["a"], [0.0, 0.0])
    # a NaN coordinate ranks as the largest value and is trimmed
    bad = [{"a": jnp.array([np.nan, 0.0])}] + ups
    out, _, _ = gather_run(agg.median(), bad, [1.0] * 4)
    np.testing.assert_allclose(out["a"], [4.0, 0.5])
    assert agg.median().gathers and agg.trimmed_mean(0.1).gathers
    assert not agg.mean().gathers and not agg.chain(agg.clip(1.0), agg.weighted_mean()).gathers


def test_byzantine_client_wrecks_fedavg_not_robust_means():
    rng = np.random.default_rng(0)
    honest = [{"a": jnp.asarray(1.0 + 0.1 * rng.normal(size=50), jnp.float32)} for _ in range(9)]
    honest_mean = np.mean([np.asarray(u["a"]) for u in honest], axis=0)
    attacked = honest + [{"a": jnp.full((50,), 1e6, jnp.float32)}]
    weights = [10.0] * len(attacked)
    total = None
    for i, (u, w) in enumerate(zip(attacked, weights)):  # the sum path, as the engine runs weighted_mean
        c = agg.weighted_mean().contribution(u, jnp.float32(w), jax.random.key(i))
        total = c if total is None else jax.tree.map(jnp.add, total, c)
    fedavg_out = agg.weighted_mean().finalize(total, jax.random.key(0))[0]["a"]
    assert np.max(np.abs(fedavg_out - honest_mean)) > 1e4
    for robust in (agg.median(), agg.trimmed_mean(0.1), agg.chain(agg.clip(100.0), agg.median())):
        out = gather_run(robust, attacked, weights)[0]["a"]
        assert np.max(np.abs(out - honest_mean)) < 0.3, robust.name


# ------------------------------------------------------------------------------------- in the engine
FIT = dict(clients_per_round=5, batch_size=4, verbose=0)


def trainer(aggregator, data, backend, **kw):
    return fedtrain.FederatedTrainer(Linear(features=8, rngs=nnx.Rngs(0)), data,
                                     fedavg(optax.sgd(0.1), aggregator=aggregator), backend=backend, seed=3, **kw)


def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


AGGREGATORS = {
    "trimmed_mean": lambda: agg.trimmed_mean(0.2),
    "median": agg.median,
    "clip_median": lambda: agg.chain(agg.clip(1.0), agg.median()),
    "quantized_trimmed_mean": lambda: agg.chain(agg.uniform_quantization(16), agg.trimmed_mean(0.1)),
}


@pytest.mark.parametrize("name", list(AGGREGATORS))
def test_backends_agree(name):
    data = fedtrain.InMemoryFederatedData(make_clients(num_clients=9, max_size=14))
    runs = {
        "scan": trainer(AGGREGATORS[name](), data, "scan"),
        "vmap": trainer(AGGREGATORS[name](), data, "vmap", lanes=2),  # 5 clients in 2 lanes: an empty slot
        "lane_groups": trainer(AGGREGATORS[name](), data, "vmap", lanes=5, lane_group=2),
        "sharded": trainer(AGGREGATORS[name](), data, "sharded", lanes=2),  # shard_map on this host's mesh
        "debug": trainer(AGGREGATORS[name](), data, "debug"),
    }
    for backend, t in runs.items():
        if backend == "sharded":  # 5 clients over 2 lanes: padded with an empty slot, which it warns about
            with pytest.warns(RuntimeWarning, match="padded with empty slots"):
                t.fit(rounds=2, **FIT)
        else:
            t.fit(rounds=2, **FIT)
    scan = runs["scan"]
    assert max_diff(scan.params, scan.model_fns.init_params) > 1e-3, "training did not move the model"
    for backend, t in runs.items():
        assert max_diff(scan.server_state, t.server_state) < 1e-5, backend
        np.testing.assert_allclose(scan.history.history["loss"], t.history.history["loss"], rtol=1e-5)
        for key in ("update_norm", "robust_trimmed", "clipped_fraction", "bits_per_client"):
            if key in scan.history.history:
                np.testing.assert_allclose(scan.history.history[key], t.history.history[key], rtol=1e-5)
    logs = scan.history.history
    assert ("robust_trimmed" in logs) == ("trimmed" in name)
    if name == "trimmed_mean":
        assert logs["robust_trimmed"] == [2.0, 2.0]  # floor(0.2 * 5) from each end
    if name == "clip_median":
        assert all(0.0 <= f <= 1.0 for f in logs["clipped_fraction"])  # clip's side still reaches its server


def test_round_matches_numpy_median_of_client_deltas():
    """One compiled round's aggregate is the coordinate-wise median of the clients' own deltas,
    and an empty padded client in the cohort changes nothing."""
    clients = make_clients(num_clients=5, max_size=14)
    ids = list(clients)[:4]
    empty = {"x": np.zeros((0, 8), np.float32), "y": np.zeros((0,), np.int32)}

    def one_round(cohort, extra_capacity, lanes, aggregator):  # batch order follows the position in `clients`
        return run_engine_round(clients, cohort, fedavg(optax.sgd(0.1), aggregator=aggregator), lanes=lanes,
                                extra_capacity=extra_capacity, empty=empty)

    # each client's delta from a weighted-mean round of that client alone
    deltas = []
    for c in ids:
        state, out = one_round([c], 0, 1, agg.weighted_mean())
        deltas.append(jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), state.params, out.server_state.params))
    state, base = one_round(ids, 0, 1, agg.median())
    expected = jax.tree.map(lambda p, *d: np.asarray(p) - np.median(np.stack(d), axis=0), state.params, *deltas)
    assert max_diff(base.server_state.params, expected) < 1e-6
    _, padded = one_round(ids + ["empty"], 5, 1, agg.median())
    _, lanes = one_round(ids + ["empty"], 3, 3, agg.median())
    assert max_diff(base.server_state, padded.server_state) < 1e-6
    assert max_diff(base.server_state, lanes.server_state) < 1e-6


def test_robust_means_resist_a_poisoned_client():
    """A client whose features are scaled by 1e3 sends a huge delta: FedAvg's model is wrecked, the
    median's and the trimmed mean's stay near the model FedAvg trains without that client."""
    clients = make_clients(num_clients=7, max_size=14, seed=1)
    honest = fedtrain.InMemoryFederatedData(dict(list(clients.items())[:6]))
    bad = dict(clients)
    bad["client_006"] = dict(bad["client_006"], x=bad["client_006"]["x"] * 1e3)
    attacked = fedtrain.InMemoryFederatedData(bad)

    def params(data, aggregator, k):
        t = trainer(aggregator, data, "scan")
        t.fit(rounds=1, clients_per_round=k, batch_size=4, verbose=0)
        return t.params

    reference = params(honest, agg.weighted_mean(), 6)
    assert max_diff(params(attacked, agg.weighted_mean(), 7), reference) > 10.0
    for robust in (agg.median(), agg.trimmed_mean(0.2)):
        assert max_diff(params(attacked, robust, 7), reference) < 0.1, robust.name


def test_validation():
    for beta in (-0.1, 0.5, 0.7, float("nan")):
        with pytest.raises(ValueError, match="0 <= beta < 0.5"):
            agg.trimmed_mean(beta)
    with pytest.raises(ValueError, match="gaussian_noise cannot come before median"):
        agg.chain(agg.clip(1.0), agg.gaussian_noise(1.0), agg.median())
    with pytest.raises(ValueError, match="exactly one mean"):
        agg.chain(agg.median(), agg.mean())
    gathering_clip = agg.clip(1.0)._replace(gathers=True)
    with pytest.raises(ValueError, match="only the mean stage can gather"):
        agg.chain(gathering_clip, agg.median())
    # clipping and quantization before a gathering mean are fine; a stage that rewrites the sum is not
    agg.chain(agg.clip(1.0), agg.median())
    agg.chain(agg.adaptive_clip(1.0), agg.uniform_quantization(8), agg.trimmed_mean(0.1))
    unchecked = agg.Aggregator(agg.chain(agg.clip(1.0), agg.gaussian_noise(1.0), agg.mean()).stages[:2]
                               + agg.median().stages)
    with pytest.raises(ValueError, match="'gaussian_noise' changes the summed update"):
        gather_run(unchecked, [{"a": jnp.ones(3)}], [1.0])


@pytest.mark.slow
def test_two_devices_equal_one():
    """The gathered updates sharded over two (forced CPU) devices give the one-device round."""
    code = (
        "import os\n"
        "os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'\n"
        "import jax, numpy as np, optax, fedtrain\n"
        "from flax import nnx\n"
        "from fedtrain import aggregators as agg\n"
        "from tests.conftest import Linear, make_clients\n"
        "data = fedtrain.InMemoryFederatedData(make_clients(num_clients=9, max_size=14))\n"
        "def run(backend, **kw):\n"
        "    t = fedtrain.FederatedTrainer(Linear(features=8, rngs=nnx.Rngs(0)), data,\n"
        "        fedtrain.algorithms.fedavg(optax.sgd(0.1), aggregator=agg.chain(agg.clip(1.0), agg.trimmed_mean(0.2))),\n"
        "        backend=backend, seed=3, **kw)\n"
        "    t.fit(rounds=2, clients_per_round=5, batch_size=4, verbose=0)\n"
        "    return t\n"
        "one, two = run('scan'), run('sharded', lanes=4)\n"
        "assert two.engine.mesh.size == 2\n"
        "d = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))\n"
        "        for a, b in zip(jax.tree.leaves(one.server_state), jax.tree.leaves(two.server_state)))\n"
        "assert d < 1e-5, d\n"
        "print('OK')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
