"""SCAFFOLD (Karimireddy et al., 2020), option II control variates.

Each client keeps a control variate ``c_i`` (persistent client state); the server keeps ``c``.
Local SGD steps use ``g + c - c_i``. After ``K`` steps at rate ``lr`` the client sets
``c_i+ = c_i - c + (x - y_i) / (K lr)`` and sends ``x - y_i`` (aggregated into the server update)
and ``c_i+ - c_i``. The server moves ``x`` by ``server_tx`` on the mean delta and sets
``c <- c + (1/N) sum_i (c_i+ - c_i)``: the mean over the cohort times ``|S|/N`` for a population
of ``N`` clients.

Option II reads ``(x - y_i) / (K lr)`` as the client's mean corrected gradient, which holds for plain
SGD at a constant rate only: the client optimizer is ``optax.sgd(lr)`` (or
``optax.inject_hyperparams(optax.sgd)(learning_rate=lr)``, whose rate a client
``LearningRateScheduler`` may change between rounds). :func:`sgd_learning_rate` checks that by
running the transformation on probe gradients, and refuses momentum, adaptive scaling, weight decay,
clipping and schedules.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
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
    opt_state: Any = ()  # the client optimizer's (plain SGD: empty, or the injected rate)


_NOT_SGD = ("SCAFFOLD's option II control variates need plain SGD at a constant rate on the clients "
            "(the update (x - y_i) / (K lr) is the mean corrected gradient only then); build client_tx with "
            "optax.sgd(learning_rate) or optax.inject_hyperparams(optax.sgd)(learning_rate=...) and no momentum, "
            "schedule, weight decay or clipping (a client LearningRateScheduler changes an injected rate "
            "between rounds).")

# Probe gradients: coordinates of different sizes and signs, so any transformation that is not a
# multiple of the gradient (adaptive scaling, clipping, momentum, weight decay) shows.
_PROBE_PARAMS = np.array([0.5, -1.0, 2.0, 0.25, -3.0], np.float32)
_PROBE_GRADS = np.array([[1.0, -2.0, 0.5, 3.0, -0.25], [-0.25, 4.0, 1.0, -1.0, 2.0], [2.0, 0.5, -3.0, 0.125, 1.0],
                         [-1.5, -0.75, 0.25, 2.5, -4.0]], np.float32)


def _has_schedule(state) -> bool:
    leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
    return any(isinstance(x, optax.ScaleByScheduleState) for x in leaves)


def sgd_learning_rate(client_tx: optax.GradientTransformation) -> float:
    """The learning rate of ``client_tx`` if it is plain SGD at a constant rate (``optax.sgd(lr)``, also
    under ``optax.inject_hyperparams``); else ``ValueError``. Found by running the transformation on
    a few probe gradients (the update must be ``-lr * g`` at every step, for every coordinate)."""
    if not isinstance(client_tx, optax.GradientTransformation):
        raise TypeError(f"SCAFFOLD's client_tx must be an optax transformation such as optax.sgd(0.1) (or a "
                        f"float learning rate); got {type(client_tx).__name__}.")
    params = {"w": jnp.asarray(_PROBE_PARAMS)}
    try:
        state = client_tx.init(params)
        if _has_schedule(state):
            raise ValueError(f"SCAFFOLD: client_tx has a learning-rate schedule. {_NOT_SGD}")
        rates = []
        for g in _PROBE_GRADS:
            updates, state = client_tx.update({"w": jnp.asarray(g)}, state, params)
            u = np.asarray(updates["w"], np.float64)
            ratio = -u / g.astype(np.float64)
            if not (np.all(np.isfinite(ratio)) and np.allclose(ratio, ratio[0], rtol=1e-5, atol=0)):
                raise ValueError(f"SCAFFOLD: client_tx does not move the parameters by a multiple of the gradient "
                                 f"(probe gradient {g.tolist()} gave the update {u.tolist()}). {_NOT_SGD}")
            rates.append(float(ratio[0]))
            params = optax.apply_updates(params, updates)
    except ValueError:
        raise
    except Exception as e:  # transformations that need extra arguments, or are not for params trees
        raise ValueError(f"SCAFFOLD: client_tx cannot be probed as plain SGD ({type(e).__name__}: {e}). "
                         f"{_NOT_SGD}") from e
    if not np.allclose(rates, rates[0], rtol=1e-5, atol=0):
        raise ValueError(f"SCAFFOLD: client_tx changes its learning rate from step to step ({rates}). {_NOT_SGD}")
    return rates[0]


def _injected_rate(opt_state):
    """The injected ``learning_rate`` in a client optimizer state (``None`` for plain ``optax.sgd``)."""
    from fedtrain.engine.hyperparams import _injected_nodes

    for node in _injected_nodes(opt_state):
        if "learning_rate" in node.hyperparams:
            return node.hyperparams["learning_rate"]
    return None


def scaffold(client_tx: optax.GradientTransformation | float | None = None, server_learning_rate: float = 1.0, *,
             server_tx: optax.GradientTransformation | None = None, aggregator: Aggregator | None = None,
             num_clients: int | None = None, client_learning_rate: float | None = None) -> Algorithm:
    """SCAFFOLD with local plain SGD ``client_tx`` (``optax.sgd(lr)``, as the other factories take an
    optax client optimizer; a float, or ``client_learning_rate=``, is the rate itself). The population
    size ``N`` is the trainer's (``ctx.num_clients``) unless ``num_clients`` is given; the update is
    the uniform mean of client deltas, as in the paper."""
    if client_tx is not None and client_learning_rate is not None:
        raise TypeError("scaffold() takes client_tx (e.g. optax.sgd(0.1)) or client_learning_rate, not both.")
    if client_tx is None and client_learning_rate is None:
        raise TypeError("scaffold() needs the client optimizer: scaffold(optax.sgd(0.1)) (plain SGD).")
    rate = client_tx if client_learning_rate is None else client_learning_rate
    if isinstance(rate, optax.GradientTransformation):
        lr = sgd_learning_rate(rate)
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"SCAFFOLD needs a client learning rate > 0 (option II divides by it); client_tx "
                             f"moves by {-lr} * gradient.")
        tx = rate
    elif isinstance(rate, (int, float, np.number)) and not isinstance(rate, bool):
        check_nonnegative(client_learning_rate=rate)
        if not rate > 0:
            raise ValueError("SCAFFOLD needs client_learning_rate > 0 (option II divides by it).")
        lr = float(rate)
        tx = optax.sgd(lr)
    else:
        raise TypeError(f"SCAFFOLD's client_tx must be plain SGD, optax.sgd(learning_rate), or a float learning "
                        f"rate; got {type(rate).__name__} {rate!r}.")
    check_nonnegative(server_learning_rate=server_learning_rate)
    server_tx = server_tx or optax.sgd(server_learning_rate)

    def init(params):
        return ScaffoldState(params, server_tx.init(params), tree_zeros(params))

    def broadcast(state, ctx):
        return ScaffoldBroadcast(state.params, state.control)

    def client_init(bc, client_control, prepass, ctx):
        return ScaffoldLocal(bc.params, tree_sub(bc.control, client_control), ctx.init_optimizer(tx, bc.params))

    def client_step(local, batch, ctx):
        grads, sums = ctx.grad(local.params, batch)
        corrected = jax.tree.map(jnp.add, grads, local.correction)  # g + c - c_i
        updates, opt_state = tx.update(corrected, local.opt_state, local.params)
        return local._replace(params=optax.apply_updates(local.params, updates), opt_state=opt_state), sums

    def client_final(bc, local, ctx):
        injected = _injected_rate(local.opt_state)
        rate = lr if injected is None else jnp.asarray(injected, jnp.float32)
        delta = tree_sub(bc.params, local.params)
        scaled = tree_scale(delta, 1.0 / (jnp.maximum(ctx.num_steps, 1) * rate))  # (x - y_i) / (K lr)
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
