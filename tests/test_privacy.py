"""Privacy accounting: epsilon against dp_accounting directly, the noise-multiplier search, DPAccountant."""

import dp_accounting
import numpy as np
import optax
import pytest
from flax import nnx

import fedtrain
from fedtrain import privacy
from fedtrain.algorithms import dp_fedavg, fedavg
from fedtrain.samplers import PoissonSampler
from tests.conftest import Linear, make_clients


def direct_epsilon(z, q, rounds, delta, accountant):
    acc = dp_accounting.rdp.RdpAccountant() if accountant == "rdp" else dp_accounting.pld.PLDAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds))
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_epsilon_matches_dp_accounting(accountant):
    for z, q, rounds in [(1.1, 0.01, 500), (0.8, 0.1, 20), (3.0, 1.0, 5)]:
        assert privacy.compute_epsilon(z, q, rounds, 1e-5, accountant) == pytest.approx(
            direct_epsilon(z, q, rounds, 1e-5, accountant), rel=1e-9)
    assert privacy.compute_epsilon(1.0, 0.1, 0, 1e-5) == 0.0
    assert privacy.compute_epsilon(0.0, 0.1, 3, 1e-5) == float("inf")


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_noise_multiplier_search(accountant):
    z = privacy.noise_multiplier_for(2.0, 1e-5, 100, 0.05, accountant)
    assert privacy.compute_epsilon(z, 0.05, 100, 1e-5, accountant) <= 2.0
    assert privacy.compute_epsilon(z - 1e-2, 0.05, 100, 1e-5, accountant) > 2.0


def test_bad_privacy_input():
    with pytest.raises(ValueError, match="epsilon"):
        privacy.noise_multiplier_for(0.0, 1e-5, 10, 0.1)
    with pytest.raises(ValueError, match="delta"):
        privacy.compute_epsilon(1.0, 0.1, 10, 1.5)
    with pytest.raises(ValueError, match="sampling_probability"):
        privacy.compute_epsilon(1.0, 0.0, 10, 1e-5)
    with pytest.raises(ValueError, match="accountant"):
        privacy.make_accountant("moments")
    with pytest.raises(ValueError, match="target_epsilon"):
        privacy.DPAccountant(1e-5, target_epsilon=-1.0)


def make_trainer(algorithm, sampler=None):
    data = fedtrain.InMemoryFederatedData(make_clients(num_clients=10))
    return fedtrain.FederatedTrainer(Linear(features=8, rngs=nnx.Rngs(0)), data, algorithm, sampler=sampler)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_dp_accountant_logs_epsilon_every_round(accountant):
    z, delta = 1.2, 1e-5
    trainer = make_trainer(dp_fedavg(optax.sgd(0.1), z, 1.0, expected_clients_per_round=4))
    cb = privacy.DPAccountant(delta, accountant=accountant)
    history = trainer.fit(rounds=3, clients_per_round=4, batch_size=8, verbose=0, callbacks=[cb])
    expected = [direct_epsilon(z, 0.4, r, delta, accountant) for r in (1, 2, 3)]
    np.testing.assert_allclose(history.history["dp_epsilon"], expected, rtol=1e-9)
    # continuing training keeps counting from the rounds already done
    trainer.fit(rounds=4, clients_per_round=4, batch_size=8, verbose=0, callbacks=[cb])
    assert history.history["dp_epsilon"][-1] == pytest.approx(direct_epsilon(z, 0.4, 4, delta, accountant))


def test_dp_accountant_uses_the_samplers_probability_and_stops_at_target():
    z, delta, q = 2.0, 1e-5, 0.3
    target = direct_epsilon(z, q, 4, delta, "rdp") * 1.0001
    trainer = make_trainer(dp_fedavg(optax.sgd(0.1), z, 1.0, expected_clients_per_round=3),
                           sampler=PoissonSampler(q))
    history = trainer.fit(rounds=20, clients_per_round=3, batch_size=8, verbose=0,
                          callbacks=[privacy.DPAccountant(delta, target_epsilon=target)])
    assert trainer.round == 4
    assert history.history["dp_epsilon"][-1] <= target
    assert history.history["dp_epsilon"][-1] == pytest.approx(direct_epsilon(z, q, 4, delta, "rdp"))


def test_dp_accountant_errors_before_training():
    trainer = make_trainer(dp_fedavg(optax.sgd(0.1), 0.5, 1.0, expected_clients_per_round=4))
    with pytest.raises(ValueError, match="unreachable"):
        trainer.fit(rounds=3, clients_per_round=4, verbose=0, callbacks=[privacy.DPAccountant(1e-5, target_epsilon=1e-3)])
    assert trainer.round == 0
    trainer = make_trainer(fedavg(optax.sgd(0.1)))
    with pytest.raises(ValueError, match="noise_multiplier"):
        trainer.fit(rounds=1, clients_per_round=4, verbose=0, callbacks=[privacy.DPAccountant(1e-5)])

    class NoProbability:
        def sample(self, seed, r, population, k):
            return np.arange(k)

    trainer = make_trainer(dp_fedavg(optax.sgd(0.1), 1.0, 1.0, 4), sampler=NoProbability())
    with pytest.raises(ValueError, match="sampling_probability"):
        trainer.fit(rounds=1, clients_per_round=4, verbose=0, callbacks=[privacy.DPAccountant(1e-5)])
