"""Faults that must never cost progress or the right model: a non-finite server state is caught in
the compiled round, never selected as best, and stops TerminateOnNaN."""

import numpy as np
import optax
import pytest
from flax import nnx

import fedtrain
from fedtrain.callbacks import EarlyStopping, TerminateOnNaN
from tests.conftest import TinyMLP, make_clients


def zero_feature_clients():
    """Feature 0 is zero everywhere: its first-layer weights get a zero gradient, and Adam with
    eps=0 turns 0/0 into NaN parameters while the round's loss (measured before the update) is finite."""
    clients = make_clients(num_clients=6)
    for ex in clients.values():
        ex["x"][:, 0] = 0.0
    return clients


def adam_eps0_trainer(clients):
    return fedtrain.FederatedTrainer(TinyMLP(rngs=nnx.Rngs(0)), clients,
                                     fedtrain.algorithms.fedadam(optax.sgd(0.1), server_eps=0.0))


FIT = dict(clients_per_round=3, batch_size=4, verbose=0)


@pytest.mark.parametrize("backend", ["scan", "debug"])
def test_a_non_finite_server_state_is_seen_although_the_loss_is_finite(backend):
    trainer = fedtrain.FederatedTrainer(TinyMLP(rngs=nnx.Rngs(0)), zero_feature_clients(),
                                        fedtrain.algorithms.fedadam(optax.sgd(0.1), server_eps=0.0), backend=backend)
    stopper = TerminateOnNaN()
    with pytest.warns(RuntimeWarning, match="loss is finite but the new server state .* holds NaN or inf"):
        trainer.fit(rounds=5, callbacks=[stopper], **FIT)
    assert np.isfinite(trainer.history.history["loss"][0])
    assert trainer.last_round_info["state_finite"] is False
    assert stopper.stopped_round == 0 and trainer.round == 1
    assert not all(np.isfinite(np.asarray(x)).all() for x in jax_leaves(trainer.params))


def test_a_finite_state_is_reported_finite():
    trainer = fedtrain.FederatedTrainer(TinyMLP(rngs=nnx.Rngs(0)), make_clients(num_clients=6),
                                        fedtrain.algorithms.fedadam(optax.sgd(0.1)))
    trainer.fit(rounds=2, callbacks=[TerminateOnNaN()], **FIT)
    assert trainer.last_round_info["state_finite"] is True and trainer.round == 2


def test_early_stopping_never_keeps_a_non_finite_state_as_best():
    trainer = adam_eps0_trainer(zero_feature_clients())
    stopper = EarlyStopping(monitor="loss", patience=10, restore_best_weights=True)
    with pytest.warns(RuntimeWarning):
        trainer.fit(rounds=3, callbacks=[stopper], **FIT)
    assert stopper.best == np.inf  # every round's state was NaN: none became the best
    assert trainer.last_round_info["state_finite"] is False


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)
