"""FedOpt (Reddi et al., 2021): local optimizer on clients, any optax optimizer on the server.

Clients run ``client_tx`` from the broadcast model; each sends its model delta
``broadcast - local`` (a pseudo-gradient). The weighted mean of the deltas is
fed to ``server_tx`` as a gradient. FedAvg is FedOpt with server SGD at rate 1.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from fedtrain.aggregators import Aggregator, weighted_mean
from fedtrain.algorithms.base import Algorithm, ClientOut
from fedtrain.models.adapter import grad_and_metrics


class ServerState(NamedTuple):
    params: Any
    opt_state: Any
    aggregator: Any = ()


class ClientLocal(NamedTuple):
    params: Any
    opt_state: Any
    rng: jax.Array


def fedopt(
    client_tx: optax.GradientTransformation,
    server_tx: optax.GradientTransformation,
    *,
    aggregator: Aggregator | None = None,
    name: str = "fedopt",
    hyperparams: dict | None = None,
) -> Algorithm:
    """FedOpt with ``client_tx`` on clients and ``server_tx`` applied to the mean client delta."""

    agg = aggregator or weighted_mean()

    def init(params):
        return ServerState(params, server_tx.init(params), agg.init(params) if agg.stateful else ())

    def broadcast(state):
        return state.params

    def client_init(model, params, client_state, rng):
        del model, client_state
        return ClientLocal(params, client_tx.init(params), rng)

    def client_step(model, local, batch):
        rng, step_rng = jax.random.split(local.rng)
        grads, sums = grad_and_metrics(model, local.params, batch, step_rng)
        updates, opt_state = client_tx.update(grads, local.opt_state, local.params)
        return ClientLocal(optax.apply_updates(local.params, updates), opt_state, rng), sums

    def client_final(model, params, local, num_examples):
        del model
        delta = jax.tree.map(lambda g, l: g - l, params, local.params)
        return ClientOut(delta, num_examples)

    def server_update(state, mean_delta):
        updates, opt_state = server_tx.update(mean_delta, state.opt_state, state.params)
        return state._replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state), {}

    return Algorithm(
        name=name,
        init=init,
        broadcast=broadcast,
        client_init=client_init,
        client_step=client_step,
        client_final=client_final,
        server_update=server_update,
        params=lambda state: state.params,
        aggregator=agg,
        hyperparams=dict(hyperparams or {}),
    )


def fedavg(client_tx: optax.GradientTransformation, server_learning_rate: float = 1.0, **kw) -> Algorithm:
    """FedAvg (McMahan et al., 2017): server SGD on the mean delta; rate 1 is plain averaging."""
    return fedopt(client_tx, optax.sgd(server_learning_rate), name="fedavg",
                  hyperparams={"server_learning_rate": server_learning_rate}, **kw)


def fedavgm(
    client_tx: optax.GradientTransformation,
    server_learning_rate: float = 1.0,
    server_momentum: float = 0.9,
    **kw,
) -> Algorithm:
    """FedAvgM (Hsu et al., 2019): server SGD with heavy-ball momentum."""
    return fedopt(client_tx, optax.sgd(server_learning_rate, momentum=server_momentum), name="fedavgm",
                  hyperparams={"server_learning_rate": server_learning_rate, "server_momentum": server_momentum},
                  **kw)


def fedadam(
    client_tx: optax.GradientTransformation,
    server_learning_rate: float = 1e-2,
    server_b1: float = 0.9,
    server_b2: float = 0.99,
    server_eps: float = 1e-3,
    **kw,
) -> Algorithm:
    """FedAdam (Reddi et al., 2021); ``server_eps`` is the paper's adaptivity tau."""
    hp = dict(server_learning_rate=server_learning_rate, server_b1=server_b1, server_b2=server_b2,
              server_eps=server_eps)
    return fedopt(client_tx, optax.adam(server_learning_rate, server_b1, server_b2, server_eps),
                  name="fedadam", hyperparams=hp, **kw)


def fedyogi(
    client_tx: optax.GradientTransformation,
    server_learning_rate: float = 1e-2,
    server_b1: float = 0.9,
    server_b2: float = 0.99,
    server_eps: float = 1e-3,
    server_initial_accumulator_value: float = 1e-6,
    **kw,
) -> Algorithm:
    """FedYogi (Reddi et al., 2021); ``server_eps`` is the paper's adaptivity tau."""
    hp = dict(server_learning_rate=server_learning_rate, server_b1=server_b1, server_b2=server_b2,
              server_eps=server_eps, server_initial_accumulator_value=server_initial_accumulator_value)
    tx = optax.chain(
        optax.scale_by_yogi(server_b1, server_b2, server_eps,
                            initial_accumulator_value=server_initial_accumulator_value),
        optax.scale_by_learning_rate(server_learning_rate),
    )
    return fedopt(client_tx, tx, name="fedyogi", hyperparams=hp, **kw)


def fedadagrad(
    client_tx: optax.GradientTransformation,
    server_learning_rate: float = 1e-1,
    server_eps: float = 1e-2,
    server_initial_accumulator_value: float = 0.0,
    **kw,
) -> Algorithm:
    """FedAdagrad (Reddi et al., 2021); ``server_eps`` is the paper's adaptivity tau."""
    hp = dict(server_learning_rate=server_learning_rate, server_eps=server_eps,
              server_initial_accumulator_value=server_initial_accumulator_value)
    tx = optax.adagrad(server_learning_rate, initial_accumulator_value=server_initial_accumulator_value,
                       eps=server_eps)
    return fedopt(client_tx, tx, name="fedadagrad", hyperparams=hp, **kw)
