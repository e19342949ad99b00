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
from fedtrain.algorithms.base import Algorithm, ClientOut, RunInfo, check_nonnegative
from fedtrain.models.adapter import grad_and_metrics


class ScaffoldState(NamedTuple):
    params: Any
    opt_state: Any
    control: Any
    aggregator: Any = ()


class ScaffoldBroadcast(NamedTuple):
    params: Any
    control: Any


class ScaffoldLocal(NamedTuple):
    params: Any
    rng: jax.Array
    correction: Any  # c - c_i
    steps: jax.Array


def scaffold(client_learning_rate: float, server_learning_rate: float = 1.0, *,
             server_tx: optax.GradientTransformation | None = None, aggregator: Aggregator | None = None,
             num_clients: int | None = None) -> Algorithm:
    """SCAFFOLD with local SGD at ``client_learning_rate``. The population size ``N`` comes from the
    trainer's data (or ``num_clients``); the update is the uniform mean of client deltas, as in the paper."""
    check_nonnegative(client_learning_rate=client_learning_rate, server_learning_rate=server_learning_rate)
    if not client_learning_rate > 0:
        raise ValueError("SCAFFOLD needs client_learning_rate > 0 (option II divides by it).")
    lr = float(client_learning_rate)
    server_tx = server_tx or optax.sgd(server_learning_rate)
    agg = aggregator or mean()

    def build(population: int | None) -> Algorithm:
        def init(params):
            return ScaffoldState(params, server_tx.init(params), tree_zeros(params),
                                 agg.init(params) if agg.stateful else ())

        def client_init(model, bc, client_control, rng):
            del model
            return ScaffoldLocal(bc.params, rng, tree_sub(bc.control, client_control), jnp.zeros((), jnp.float32))

        def client_step(model, local, batch):
            rng, step_rng = jax.random.split(local.rng)
            grads, sums = grad_and_metrics(model, local.params, batch, step_rng)
            params = jax.tree.map(lambda w, g, c: w - lr * (g + c), local.params, grads, local.correction)
            return local._replace(params=params, rng=rng, steps=local.steps + 1), sums

        def client_final(model, bc, local, num_examples):
            del model
            delta = tree_sub(bc.params, local.params)
            scaled = tree_scale(delta, 1.0 / (jnp.maximum(local.steps, 1.0) * lr))  # (x - y_i) / (K lr)
            # c_i+ = c_i - c + (x - y_i) / (K lr), and c_i - c = -correction
            return ClientOut(delta, num_examples, tree_sub(scaled, local.correction),
                             stats=tree_sub(scaled, bc.control))

        def server_update(state, mean_delta, control_delta_sum):
            if population is None:
                raise ValueError("SCAFFOLD needs the population size N for c <- c + (1/N) sum_i dc_i; "
                                 "train it with FederatedTrainer or pass num_clients=.")
            updates, opt_state = server_tx.update(mean_delta, state.opt_state, state.params)
            control = tree_add(state.control, tree_scale(control_delta_sum, 1.0 / population))
            return state._replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state,
                                  control=control), {}

        return Algorithm("scaffold", init, lambda s: ScaffoldBroadcast(s.params, s.control), client_init,
                         client_step, client_final, server_update, lambda s: s.params, agg,
                         client_state_init=tree_zeros,
                         hyperparams={"client_learning_rate": lr, "server_learning_rate": server_learning_rate},
                         bind=bind)

    def bind(info: RunInfo) -> Algorithm:
        population = num_clients if num_clients is not None else info.num_clients
        if population is None:
            raise ValueError("SCAFFOLD needs to know how many clients the population has (the C/N factor); "
                             "the sampler's population is unknown here, pass scaffold(..., num_clients=N).")
        return build(int(population))

    return build(num_clients)
