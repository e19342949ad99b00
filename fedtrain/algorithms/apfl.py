"""APFL (Deng, Kamani and Mahdavi, 2020, "Adaptive Personalized Federated Learning"), as in FedJAX.

Each client keeps a personal model ``v`` and a mixing weight ``alpha`` per parameter leaf (its
client state). In a round it trains a copy ``w`` of the broadcast model and, at every local step
on the same batch, with ``mix = alpha v + (1 - alpha) w`` taken before the step:

- ``w`` takes a ``client_tx`` step on ``grad L(w)``;
- ``v`` takes a ``client_tx`` step on ``g = grad L(mix)`` (the gradient at the mixture, as FedJAX);
- ``alpha`` takes a step on ``<v - w, g>`` (summed over the leaf), then is clipped to ``[0, 1]``.

The three have their own optimizer states, started afresh each round; ``v`` and ``alpha`` are kept.
A client's first ``v`` is the broadcast model of its first round. Clients send ``broadcast - w``;
the server feeds the weighted mean (by examples) to ``server_tx`` as a gradient, as FedAvg.
A client with stored state is evaluated on ``alpha v + (1 - alpha) w_server`` (``personal_params``);
before its first round that is ``w_server``, as FedJAX's evaluation of a client without state.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedtrain.aggregators import Aggregator, weighted_mean
from fedtrain.algorithms._common import tree_sub
from fedtrain.algorithms.base import Algorithm, ClientOut, check_nonnegative


class APFLState(NamedTuple):
    params: Any
    opt_state: Any


class APFLClientState(NamedTuple):
    params: Any  # the personal model v
    alpha: Any  # one scalar per parameter leaf
    started: jax.Array  # 0 before the client's first round, then 1


class APFLLocal(NamedTuple):
    params: Any  # w, the local copy of the global model
    opt_state: Any
    personal: Any  # v
    personal_opt_state: Any
    alpha: Any
    alpha_opt_state: Any


def mixture(alpha: Any, personal: Any, params: Any) -> Any:
    """``alpha * personal + (1 - alpha) * params``, leaf by leaf (``alpha`` has one scalar per leaf)."""
    return jax.tree.map(lambda a, v, w: a * v + (1 - a) * w, alpha, personal, params)


def apfl(client_tx: optax.GradientTransformation, server_tx: optax.GradientTransformation | None = None, *,
         alpha: float = 0.25, adaptive_alpha: bool = True, alpha_learning_rate: float | None = None,
         server_learning_rate: float | None = None, aggregator: Aggregator | None = None) -> Algorithm:
    """APFL with ``client_tx`` for ``w``, ``v`` and (by default) ``alpha``, and ``server_tx`` on the
    mean client delta (default ``optax.sgd(server_learning_rate or 1.0)``, FedAvg).

    ``alpha`` is every client's initial mixing weight (FedJAX's ``client_coefficient``, which has no
    default; 0.25 is one of the paper's values). Beyond FedJAX: ``adaptive_alpha=False`` keeps
    ``alpha`` fixed (the paper's non-adaptive APFL); ``alpha_learning_rate`` steps ``alpha`` by plain
    SGD at that rate instead of ``client_tx``."""
    if not isinstance(client_tx, optax.GradientTransformation):
        raise TypeError(f"APFL's client_tx must be an optax transformation such as optax.sgd(0.1); got "
                        f"{type(client_tx).__name__}.")
    if server_tx is not None and not isinstance(server_tx, optax.GradientTransformation):
        raise TypeError(f"APFL's server_tx must be an optax transformation such as optax.sgd(1.0) or None; got "
                        f"{type(server_tx).__name__}.")
    try:
        a0 = float(alpha)
    except (TypeError, ValueError):
        raise TypeError(f"APFL's alpha must be a number in [0, 1], got {alpha!r}.") from None
    if not (0.0 <= a0 <= 1.0) or not math.isfinite(a0):
        raise ValueError(f"APFL's alpha is the initial weight of the personal model in the mixture and must be in "
                         f"[0, 1], got {alpha}.")
    if alpha_learning_rate is not None:
        if not adaptive_alpha:
            raise ValueError("APFL: alpha_learning_rate sets the step of the adaptive alpha; with "
                             "adaptive_alpha=False alpha is fixed, so leave alpha_learning_rate unset.")
        check_nonnegative(alpha_learning_rate=alpha_learning_rate)
    if server_learning_rate is not None:
        if server_tx is not None:
            raise ValueError("APFL: give server_tx or server_learning_rate (server SGD at that rate), not both.")
        check_nonnegative(server_learning_rate=server_learning_rate)
    server_tx = server_tx or optax.sgd(1.0 if server_learning_rate is None else float(server_learning_rate))
    alpha_tx = (None if not adaptive_alpha else
                client_tx if alpha_learning_rate is None else optax.sgd(float(alpha_learning_rate)))

    def init(params):
        return APFLState(params, server_tx.init(params))

    def client_state_init(params):
        return APFLClientState(params, jax.tree.map(lambda x: jnp.full((), a0, jnp.result_type(x)), params),
                               jnp.zeros((), jnp.float32))

    def client_init(params, state, prepass, ctx):
        personal = jax.tree.map(lambda v, w: jnp.where(state.started > 0, v, w), state.params, params)
        alpha_opt_state = () if alpha_tx is None else ctx.init_optimizer(alpha_tx, state.alpha)
        return APFLLocal(params, ctx.init_optimizer(client_tx, params), personal,
                         ctx.init_optimizer(client_tx, personal), state.alpha, alpha_opt_state)

    def client_step(local, batch, ctx):
        w, v = local.params, local.personal
        mix = mixture(local.alpha, v, w)
        if ctx.rng is None:
            w_ctx = v_ctx = ctx
        else:
            w_key, v_key = jax.random.split(ctx.rng)
            w_ctx, v_ctx = ctx._replace(rng=w_key), ctx._replace(rng=v_key)
        w_grads, sums = w_ctx.grad(w, batch)
        v_grads, v_sums = v_ctx.grad(mix, batch)
        updates, opt_state = client_tx.update(w_grads, local.opt_state, w)
        v_updates, v_opt_state = client_tx.update(v_grads, local.personal_opt_state, v)
        new = local._replace(params=optax.apply_updates(w, updates), opt_state=opt_state,
                             personal=optax.apply_updates(v, v_updates), personal_opt_state=v_opt_state)
        if alpha_tx is not None:
            a_grads = jax.tree.map(lambda g, vi, wi: jnp.sum((vi - wi) * g), v_grads, v, w)
            a_updates, a_opt_state = alpha_tx.update(a_grads, local.alpha_opt_state, local.alpha)
            a = jax.tree.map(lambda x: jnp.clip(x, 0, 1), optax.apply_updates(local.alpha, a_updates))
            new = new._replace(alpha=a, alpha_opt_state=a_opt_state)
        return new, {**sums, **{f"personal_{k}": s for k, s in v_sums.items()}}

    def client_final(params, local, ctx):
        state = APFLClientState(local.personal, local.alpha, jnp.ones((), jnp.float32))
        mean_alpha = jnp.mean(jnp.stack([jnp.asarray(a, jnp.float32) for a in jax.tree.leaves(local.alpha)]))
        return ClientOut(tree_sub(params, local.params), ctx.num_examples, state, metrics={"alpha": mean_alpha})

    def server_update(state, mean_delta, stats, ctx):
        updates, opt_state = server_tx.update(mean_delta, state.opt_state, state.params)
        return APFLState(optax.apply_updates(state.params, updates), opt_state), {}

    def personal_params(server_state, client_state):
        alpha_used = jax.tree.map(lambda a: a * client_state.started.astype(a.dtype), client_state.alpha)
        return mixture(alpha_used, client_state.params, server_state.params)

    hyperparams = {"alpha": a0, "adaptive_alpha": bool(adaptive_alpha)}
    if alpha_learning_rate is not None:
        hyperparams["alpha_learning_rate"] = float(alpha_learning_rate)
    if server_learning_rate is not None:
        hyperparams["server_learning_rate"] = float(server_learning_rate)
    return Algorithm("apfl", init, client_init, client_step, client_final, server_update,
                     client_state_init=client_state_init, aggregator=aggregator or weighted_mean(),
                     hyperparams=hyperparams, personal_params=personal_params)
