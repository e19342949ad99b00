"""Privacy accounting: epsilon against dp_accounting directly, the noise-multiplier search, DPAccountant."""

import logging

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


def test_dp_accountant_rejects_a_mean_denominator_that_is_not_the_cohort():
    # DP-FedAvg divides the noised sum by expected_clients_per_round: 10 with cohorts of 4 scales every
    # update by 0.4. The accountant knows both numbers and stops before round 1.
    trainer = make_trainer(dp_fedavg(optax.sgd(0.1), 1.0, 1.0, expected_clients_per_round=10))
    began = []
    spy = fedtrain.callbacks.LambdaCallback(on_round_begin=lambda r, logs: began.append(r))
    with pytest.raises(ValueError, match=r"expected_clients_per_round=10.*clients_per_round=4") as info:
        trainer.fit(rounds=2, clients_per_round=4, batch_size=8, verbose=0,
                    callbacks=[privacy.DPAccountant(1e-5), spy])
    message = str(info.value)
    assert "expected_clients_per_round=4" in message and "allow_expected_clients_mismatch=True" in message
    assert trainer.round == 0 and began == []
    # Poisson sampling: the expected cohort is q * N (clients_per_round is ignored by the sampler)
    trainer = make_trainer(dp_fedavg(optax.sgd(0.1), 1.0, 1.0, expected_clients_per_round=4),
                           sampler=PoissonSampler(0.3))
    with pytest.raises(ValueError, match=r"expected_clients_per_round=4.*q \* num_clients = 0.3 \* 10 = 3"):
        trainer.fit(rounds=1, clients_per_round=4, batch_size=8, verbose=0, callbacks=[privacy.DPAccountant(1e-5)])
    # an explicit opt-in trains with the fixed denominator
    trainer = make_trainer(dp_fedavg(optax.sgd(0.1), 1.0, 1.0, expected_clients_per_round=10))
    history = trainer.fit(rounds=1, clients_per_round=4, batch_size=8, verbose=0,
                          callbacks=[privacy.DPAccountant(1e-5, allow_expected_clients_mismatch=True)])
    assert len(history.history["dp_epsilon"]) == 1


def test_dp_fedavg_without_accountant_warns_about_a_denominator_that_is_not_the_cohort():
    trainer = make_trainer(dp_fedavg(optax.sgd(0.1), 1.0, 1.0, expected_clients_per_round=10))
    with pytest.warns(RuntimeWarning, match=r"dp_fedavg: .*expected_clients_per_round=10.*clients_per_round=4.*"
                                            r"scaled by 0\.4"):
        trainer.fit(rounds=1, clients_per_round=4, batch_size=8, verbose=0)
    assert trainer.round == 1  # a warning: without an accountant the run is not a privacy claim
    trainer = make_trainer(dp_fedavg(optax.sgd(0.1), 1.0, 1.0, expected_clients_per_round=4))
    trainer.fit(rounds=1, clients_per_round=4, batch_size=8, verbose=0)  # the cohort: silent (warnings are errors)


def test_dp_accountant_accepts_the_expected_cohort_of_poisson_sampling_rounded():
    # q * N = 0.25 * 10 = 2.5 clients on average; a denominator of 2.5 or its rounding is the intended mean
    for expected in (2.5, 3):
        trainer = make_trainer(dp_fedavg(optax.sgd(0.1), 1.0, 1.0, expected_clients_per_round=expected),
                               sampler=PoissonSampler(0.25))
        trainer.fit(rounds=1, clients_per_round=3, batch_size=8, verbose=0, callbacks=[privacy.DPAccountant(1e-5)])
        assert trainer.round == 1


def test_rdp_accounting_logs_no_warnings_over_rounds(caplog, capfd):
    import absl.logging

    # z = 1, q = 0.4: dp_accounting's RDP accountant logs 8 absl warnings per epsilon (orders 1.1 .. 1.8)
    trainer = make_trainer(dp_fedavg(optax.sgd(0.1), 1.0, 1.0, expected_clients_per_round=4))
    before = logging.getLogger("absl").level
    reference = direct_epsilon(1.0, 0.4, 4, 1e-5, "rdp")  # dp_accounting itself warns here
    caplog.clear()
    capfd.readouterr()
    with caplog.at_level(logging.DEBUG, logger="absl"):
        trainer.fit(rounds=4, clients_per_round=4, batch_size=8, verbose=0,
                    callbacks=[privacy.DPAccountant(1e-5, target_epsilon=100.0)])
        privacy.compute_epsilon(1.0, 0.4, 3, 1e-5)
        privacy.noise_multiplier_for(5.0, 1e-5, 3, 0.4)
        # silenced only around the accounting: the user's own absl warnings still get through
        absl.logging.warning("a warning of the user's own")
    err = capfd.readouterr().err
    assert trainer.history.history["dp_epsilon"][-1] == pytest.approx(reference)
    warned = [r.getMessage() for r in caplog.records if r.name == "absl" and r.levelno >= logging.WARNING]
    assert warned == ["a warning of the user's own"], warned
    assert "failed to converge" not in err and "Renyi" not in err, err
    assert logging.getLogger("absl").level == before


def test_quiet_accounting_restores_the_absl_level_after_an_error():
    absl_logger = logging.getLogger("absl")
    before = absl_logger.level
    with pytest.raises(RuntimeError):
        with privacy.quiet_accounting():
            assert absl_logger.level >= logging.ERROR
            raise RuntimeError("boom")
    assert absl_logger.level == before
