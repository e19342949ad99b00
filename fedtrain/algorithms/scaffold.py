"""SCAFFOLD (Karimireddy et al., 2020), option II control variates.

Each client keeps a control variate ``c_i`` (persistent client state); the server keeps ``c``.
Local SGD steps use ``g + c - c_i``. After ``K`` steps at rate ``lr`` the client sets
``c_i+ = c_i - c + (x - y_i) / (K lr)`` and sends ``x - y_i`` (aggregated into the server update)
and ``c_i+ - c_i``. The server moves ``x`` by ``server_tx`` on the mean delta and sets
``c <- c + (1/N) sum_i (c_i+ - c_i)``: the mean over the cohort times ``|S|/N`` for a population
of ``N`` clients.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedtrain.aggregators import Aggregator, mean
from fedtrain.algorithms._common import tree_add, tree_scale, tree_sub, tree_zeros
from fedtrain.algorithms.base import Algorithm, ClientOut, check_nonnegative


class ScaffoldState(NamedTuple):
    params: Any
    opt_state: Any
    control: Any


class ScaffoldBroadcast(NamedTuple):
    params: Any
    control: Any


class ScaffoldLocal(NamedTuple):
    params: Any
    correction: Any  # c - c_i


def scaffold(client_learning_rate: float, server_learning_rate: float = 1.0, *,
             server_tx: optax.GradientTransformation | None = None, aggregator: Aggregator | None = None,
             num_clients: int | None = None) -> Algorithm:
    """SCAFFOLD with local SGD at ``client_learning_rate``. The population size ``N`` is the
    trainer's (``ctx.num_clients``) unless ``num_clients`` is given; the update is the uniform mean
    of client deltas, as in the paper."""
    check_nonnegative(client_learning_rate=client_learning_rate, server_learning_rate=server_learning_rate)
    if not client_learning_rate > 0:
        raise ValueError("SCAFFOLD needs client_learning_rate > 0 (option II divides by it).")
    lr = float(client_learning_rate)
    server_tx = server_tx or optax.sgd(server_learning_rate)

    def init(params):
        return ScaffoldState(params, server_tx.init(params), tree_zeros(params))

    def broadcast(state, ctx):
        return ScaffoldBroadcast(state.params, state.control)

    def client_init(bc, client_control, prepass, ctx):
        return ScaffoldLocal(bc.params, tree_sub(bc.control, client_control))

    def client_step(local, batch, ctx):
        grads, sums = ctx.grad(local.params, batch)
        params = jax.tree.map(lambda w, g, c: w - lr * (g + c), local.params, grads, local.correction)
        return local._replace(params=params), sums

    def client_final(bc, local, ctx):
        delta = tree_sub(bc.params, local.params)
        scaled = tree_scale(delta, 1.0 / (jnp.maximum(ctx.num_steps, 1) * lr))  # (x - y_i) / (K lr)
        # c_i+ = c_i - c + (x - y_i) / (K lr), and c_i - c = -correction
        return ClientOut(delta, ctx.num_examples, tree_sub(scaled, local.correction),
                         stats=tree_sub(scaled, bc.control))

    def server_update(state, mean_delta, control_delta_sum, ctx):
        population = num_clients or ctx.num_clients
        updates, opt_state = server_tx.update(mean_delta, state.opt_state, state.params)
        control = tree_add(state.control, tree_scale(control_delta_sum, 1.0 / population))
        return ScaffoldState(optax.apply_updates(state.params, updates), opt_state, control), {}

    return Algorithm("scaffold", init, client_init, client_step, client_final, server_update, broadcast,
                     client_state_init=tree_zeros, aggregator=aggregator or mean(),
                     hyperparams={"client_learning_rate": lr, "server_learning_rate": server_learning_rate})
