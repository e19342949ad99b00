"""FedProx (Li et al., 2020): FedAvg whose local objective adds ``mu/2 ||w - w_global||^2``."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from fedtrain.aggregators import Aggregator, weighted_mean
from fedtrain.algorithms._common import tree_sub
from fedtrain.algorithms.base import Algorithm, ClientOut, check_nonnegative
from fedtrain.algorithms.fedopt import ServerState


class ProxLocal(NamedTuple):
    params: Any
    opt_state: Any
    anchor: Any


def fedprox(client_tx: optax.GradientTransformation, mu: float, server_tx: optax.GradientTransformation | None = None,
            *, aggregator: Aggregator | None = None) -> Algorithm:
    """Clients minimise ``f_i(w) + mu/2 ||w - w_t||^2`` with ``client_tx``; the server applies
    ``server_tx`` (default SGD at rate 1, i.e. averaging) to the mean delta."""
    check_nonnegative(mu=mu)
    server_tx = server_tx or optax.sgd(1.0)

    def init(params):
        return ServerState(params, server_tx.init(params))

    def client_init(params, client_state, prepass, ctx):
        return ProxLocal(params, ctx.init_optimizer(client_tx, params), params)

    def client_step(local, batch, ctx):
        grads, sums = ctx.grad(local.params, batch)
        grads = jax.tree.map(lambda g, w, a: g + mu * (w - a), grads, local.params, local.anchor)
        updates, opt_state = client_tx.update(grads, local.opt_state, local.params)
        return local._replace(params=optax.apply_updates(local.params, updates), opt_state=opt_state), sums

    def client_final(params, local, ctx):
        return ClientOut(tree_sub(params, local.params), ctx.num_examples)

    def server_update(state, mean_delta, stats, ctx):
        updates, opt_state = server_tx.update(mean_delta, state.opt_state, state.params)
        return ServerState(optax.apply_updates(state.params, updates), opt_state), {}

    return Algorithm("fedprox", init, client_init, client_step, client_final, server_update,
                     aggregator=aggregator or weighted_mean(), hyperparams={"mu": float(mu)})
