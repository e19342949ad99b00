"""Samplers: pure functions of (seed, round); Poisson cohorts vary and are padded; weighted sampling."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import fedtrain
from fedtrain.callbacks import Callback
from fedtrain.samplers import PoissonSampler, UniformSampler, WeightedSampler
from tests.conftest import TinyMLP


def test_poisson_sampler_is_pure_and_has_rate_q():
    s = PoissonSampler(0.2)
    np.testing.assert_array_equal(s.sample(3, 5, 100), s.sample(3, 5, 100))
    sizes = [len(s.sample(0, r, 100)) for r in range(500)]
    assert len(set(sizes)) > 5  # variable cohort
    assert abs(np.mean(sizes) - 20) < 1.0
    assert max(sizes) <= s.max_cohort(100)
    counts = np.bincount(np.concatenate([s.sample(1, r, 10) for r in range(3000)]), minlength=10)
    assert np.all(np.abs(counts / 3000 - 0.2) < 0.03)


def test_poisson_sampler_bad_input():
    with pytest.raises(ValueError, match="0 < q <= 1"):
        PoissonSampler(0.0)
    with pytest.raises(ValueError, match="max_clients"):
        PoissonSampler(0.9, max_clients=2).sample(0, 0, 100)


def test_weighted_sampler_follows_weights():
    s = WeightedSampler([0.0, 1.0, 1.0, 2.0])
    draws = np.concatenate([s.sample(0, r, 4, 1) for r in range(4000)])
    freq = np.bincount(draws, minlength=4) / 4000
    assert freq[0] == 0 and abs(freq[3] - 0.5) < 0.03
    np.testing.assert_array_equal(s.sample(2, 9, 4, 2), s.sample(2, 9, 4, 2))
    assert len(set(s.sample(0, 1, 4, 3))) == 3  # without replacement
    with pytest.raises(ValueError, match="weight > 0"):
        WeightedSampler([0.0, 0.0, 1.0]).sample(0, 0, 3, 2)
    by_id = WeightedSampler({"b": 1.0})
    by_id.bind(["a", "b", "c"], np.array([5, 5, 5]))
    assert set(np.concatenate([by_id.sample(0, r, 3, 1) for r in range(20)])) == {1}


def test_poisson_rounds_are_padded_and_compile_once(data):
    algo = fedtrain.algorithms.fedavg(optax.sgd(0.1))
    trainer = fedtrain.FederatedTrainer(TinyMLP(rngs=nnx.Rngs(0)), data, algo, sampler=PoissonSampler(0.3))
    seen = []

    class Seen(Callback):
        def on_clients_sampled(self, round, client_ids):
            seen.append(list(client_ids))

    history = trainer.fit(rounds=6, batch_size=8, verbose=0, callbacks=[Seen()])
    assert [len(c) for c in seen] == history.history["num_clients"]
    assert len({len(c) for c in seen}) > 1
    assert trainer.engine.compilations == 1
    expected = [[data.client_ids[i] for i in PoissonSampler(0.3).sample(0, r, data.num_clients)] for r in range(6)]
    assert seen == expected


def test_empty_poisson_round_leaves_the_model_unchanged(data):
    algo = fedtrain.algorithms.fedavg(optax.sgd(0.1))
    sampler = PoissonSampler(1e-6, max_clients=2)
    trainer = fedtrain.FederatedTrainer(TinyMLP(rngs=nnx.Rngs(0)), data, algo, sampler=sampler)
    before = trainer.params
    history = trainer.fit(rounds=1, batch_size=8, verbose=0)
    assert history.history["num_clients"] == [0.0]
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(trainer.params)):
        np.testing.assert_array_equal(a, b)


def test_weighted_sampler_by_examples_in_fit(data):
    algo = fedtrain.algorithms.fedavg(optax.sgd(0.1))
    trainer = fedtrain.FederatedTrainer(TinyMLP(rngs=nnx.Rngs(0)), data, algo, sampler=WeightedSampler())
    history = trainer.fit(rounds=2, clients_per_round=3, batch_size=8, verbose=0)
    assert history.history["num_clients"] == [3.0, 3.0]


def test_callback_grows_the_cohort_and_swaps_the_sampler(data):
    algo = fedtrain.algorithms.fedavg(optax.sgd(0.1))
    trainer = fedtrain.FederatedTrainer(TinyMLP(rngs=nnx.Rngs(0)), data, algo)

    class Grow(Callback):
        def on_round_begin(self, round, logs=None):
            self.trainer.clients_per_round = 2 + round
            if round == 3:
                self.trainer.sampler = WeightedSampler()

    history = trainer.fit(rounds=4, clients_per_round=2, batch_size=8, verbose=0, callbacks=[Grow()])
    assert history.history["num_clients"] == [2.0, 3.0, 4.0, 5.0]
    assert trainer.engine.compilations == 4  # one program per cohort size
    assert isinstance(UniformSampler(), UniformSampler)
