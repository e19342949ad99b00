"""Agnostic FedAvg (Mohri et al., 2019; Ro et al., 2021, as in FedJAX).

Every example carries an integer feature ``domain_id`` in ``[0, D)``. The server keeps domain
weights ``lambda`` and the domains' example counts of the last ``W`` rounds; with
``alpha = lambda / mean(window)`` each client first measures its per-domain loss sums ``L_i`` and
counts ``N_i`` at the broadcast model over its whole dataset (a prepass), then trains on ``sum_d alpha_d L_d(batch) / beta_i`` with
``beta_i = alpha . N_i``; deltas are averaged with weights ``beta_i``. The server then applies
exponentiated gradient: ``lambda <- lambda * exp(eta * L / N)``, normalised.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedtrain.aggregators import Aggregator, weighted_mean
from fedtrain.algorithms._common import safe_div, tree_sub
from fedtrain.algorithms.base import Algorithm, ClientOut, Prepass, check_nonnegative
from fedtrain.models.adapter import metric_sums

DOMAIN_KEY = "domain_id"


class AgnosticState(NamedTuple):
    params: Any
    opt_state: Any
    domain_weights: jax.Array  # [D]
    domain_window: jax.Array  # [W, D] example counts of the last W rounds


class AgnosticBroadcast(NamedTuple):
    params: Any
    alpha: jax.Array


class AgnosticLocal(NamedTuple):
    params: Any
    opt_state: Any
    beta: jax.Array
    domain_stats: Any  # (loss sums [D], counts [D]) over the client's data at the broadcast model


def agnostic_fedavg(client_tx: optax.GradientTransformation, init_domain_weights: Sequence[float],
                    domain_learning_rate: float, server_tx: optax.GradientTransformation | None = None, *,
                    domain_window_size: int = 1, aggregator: Aggregator | None = None) -> Algorithm:
    """Agnostic FedAvg over ``len(init_domain_weights)`` domains (weights must sum to 1)."""
    weights0 = jnp.asarray(init_domain_weights, jnp.float32)
    if weights0.ndim != 1 or weights0.size < 1 or bool(jnp.any(weights0 < 0)) or abs(float(weights0.sum()) - 1) > 1e-5:
        raise ValueError(f"init_domain_weights must be non-negative and sum to 1, got {list(init_domain_weights)}.")
    check_nonnegative(domain_learning_rate=domain_learning_rate)
    if int(domain_window_size) < 1:
        raise ValueError(f"domain_window_size must be >= 1, got {domain_window_size}.")
    num_domains = int(weights0.size)
    server_tx = server_tx or optax.sgd(1.0)

    def domain_sums(batch, losses, counts, ctx):
        if DOMAIN_KEY not in batch:
            raise ValueError(f"agnostic_fedavg needs an integer per-example feature {DOMAIN_KEY!r} in [0, "
                             f"{num_domains}); the clients have features {list(ctx.features)}.")
        domain = batch[DOMAIN_KEY]
        return (jax.ops.segment_sum(losses, domain, num_domains), jax.ops.segment_sum(counts, domain, num_domains))

    def init(params):
        window = jnp.ones((int(domain_window_size), num_domains), jnp.float32)
        return AgnosticState(params, server_tx.init(params), weights0, window)

    def broadcast(state, ctx):
        # A domain with no examples in the window keeps alpha = lambda (FedJAX divides by zero: NaN).
        return AgnosticBroadcast(state.params, safe_div(state.domain_weights, jnp.mean(state.domain_window, axis=0)))

    def domain_losses(bc, batch, ctx):  # the prepass: every example once, at the broadcast model
        losses, counts, _ = ctx.example_losses(bc.params, batch)
        return domain_sums(batch, losses, counts, ctx)

    def client_init(bc, client_state, domain_stats, ctx):
        beta = jnp.sum(bc.alpha * domain_stats[1])
        return AgnosticLocal(bc.params, ctx.init_optimizer(client_tx, bc.params), beta, domain_stats)

    def client_step(local, batch, ctx):
        alpha = ctx.broadcast.alpha

        def objective(p):
            losses, counts, logits = ctx.example_losses(p, batch, train=True)
            loss_d, _ = domain_sums(batch, losses, counts, ctx)
            return safe_div(jnp.sum(alpha * loss_d), local.beta), logits

        grads, logits = jax.grad(objective, has_aux=True)(local.params)
        updates, opt_state = client_tx.update(grads, local.opt_state, local.params)
        new = local._replace(params=optax.apply_updates(local.params, updates), opt_state=opt_state)
        return new, metric_sums(ctx.model, batch, jax.lax.stop_gradient(logits))

    def client_final(bc, local, ctx):
        return ClientOut(tree_sub(bc.params, local.params), local.beta, stats=local.domain_stats)

    def server_update(state, mean_delta, domain_stats, ctx):
        loss_sum, num = domain_stats
        updates, opt_state = server_tx.update(mean_delta, state.opt_state, state.params)
        weights = state.domain_weights * jnp.exp(domain_learning_rate * safe_div(loss_sum, num))
        weights = weights / jnp.sum(weights)
        window = jnp.concatenate([state.domain_window[1:], num[None]], axis=0)
        metrics = {f"domain_weight_{d}": weights[d] for d in range(num_domains)}
        return AgnosticState(optax.apply_updates(state.params, updates), opt_state, weights, window), metrics

    return Algorithm("agnostic_fedavg", init, client_init, client_step, client_final, server_update, broadcast,
                     prepass=Prepass(domain_losses), aggregator=aggregator or weighted_mean(),
                     hyperparams={"domain_learning_rate": float(domain_learning_rate), "num_domains": num_domains})
