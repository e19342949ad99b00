"""FedProx (Li et al., 2020): FedAvg whose local objective adds ``mu/2 ||w - w_global||^2``."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from fedtrain.aggregators import Aggregator, weighted_mean
from fedtrain.algorithms.base import Algorithm, ClientOut, check_nonnegative
from fedtrain.algorithms.fedopt import ServerState
from fedtrain.models.adapter import grad_and_metrics


class ProxLocal(NamedTuple):
    params: Any
    opt_state: Any
    rng: jax.Array
    anchor: Any


def fedprox(client_tx: optax.GradientTransformation, mu: float, server_tx: optax.GradientTransformation | None = None,
            *, aggregator: Aggregator | None = None) -> Algorithm:
    """Clients minimise ``f_i(w) + mu/2 ||w - w_t||^2`` with ``client_tx``; the server applies
    ``server_tx`` (default SGD at rate 1, i.e. averaging) to the mean delta."""
    check_nonnegative(mu=mu)
    server_tx = server_tx or optax.sgd(1.0)
    agg = aggregator or weighted_mean()

    def init(params):
        return ServerState(params, server_tx.init(params), agg.init(params) if agg.stateful else ())

    def client_init(model, params, client_state, rng):
        del model, client_state
        return ProxLocal(params, client_tx.init(params), rng, params)

    def client_step(model, local, batch):
        rng, step_rng = jax.random.split(local.rng)
        grads, sums = grad_and_metrics(model, local.params, batch, step_rng)
        grads = jax.tree.map(lambda g, w, a: g + mu * (w - a), grads, local.params, local.anchor)
        updates, opt_state = client_tx.update(grads, local.opt_state, local.params)
        return local._replace(params=optax.apply_updates(local.params, updates), opt_state=opt_state, rng=rng), sums

    def client_final(model, params, local, num_examples):
        del model
        return ClientOut(jax.tree.map(lambda g, l: g - l, params, local.params), num_examples)

    def server_update(state, mean_delta):
        updates, opt_state = server_tx.update(mean_delta, state.opt_state, state.params)
        return state._replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state), {}

    return Algorithm("fedprox", init, lambda s: s.params, client_init, client_step, client_final, server_update,
                     lambda s: s.params, agg, hyperparams={"mu": float(mu)})
