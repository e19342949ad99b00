"""FedOpt (Reddi et al., 2021): local optimizer on clients, any optax optimizer on the server.

Clients run ``client_tx`` from the broadcast model; each sends its model delta
``broadcast - local`` (a pseudo-gradient). The weighted mean of the deltas is
fed to ``server_tx`` as a gradient. FedAvg is FedOpt with server SGD at rate 1.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import optax

from fedtrain.aggregators import Aggregator, weighted_mean
from fedtrain.algorithms.base import Algorithm, ClientOut
from fedtrain.algorithms._common import tree_sub


class ServerState(NamedTuple):
    params: Any
    opt_state: Any


class ClientLocal(NamedTuple):
    params: Any
    opt_state: Any


def fedopt(
    client_tx: optax.GradientTransformation,
    server_tx: optax.GradientTransformation,
    *,
    aggregator: Aggregator | None = None,
    name: str = "fedopt",
    hyperparams: dict | None = None,
) -> Algorithm:
    """FedOpt with ``client_tx`` on clients and ``server_tx`` applied to the mean client delta."""

    def init(params):
        return ServerState(params, server_tx.init(params))

    def client_init(params, client_state, prepass, ctx):
        return ClientLocal(params, ctx.init_optimizer(client_tx, params))

    def client_step(local, batch, ctx):
        grads, sums = ctx.grad(local.params, batch)
        updates, opt_state = client_tx.update(grads, local.opt_state, local.params)
        return ClientLocal(optax.apply_updates(local.params, updates), opt_state), sums

    def client_final(params, local, ctx):
        return ClientOut(tree_sub(params, local.params), ctx.num_examples)

    def server_update(state, mean_delta, stats, ctx):
        updates, opt_state = server_tx.update(mean_delta, state.opt_state, state.params)
        return ServerState(optax.apply_updates(state.params, updates), opt_state), {}

    return Algorithm(name, init, client_init, client_step, client_final, server_update,
                     aggregator=aggregator or weighted_mean(), hyperparams=dict(hyperparams or {}))


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
