"""Mime and MimeLite (Karimireddy et al., 2020): clients apply the server's base optimizer with its
state (momentum, Adam moments, ...) frozen; only the server updates that state, from the mean
full-batch gradient of the cohort at the broadcast model.

- MimeLite: local steps use the plain minibatch gradient ``g(y)``. Each client computes its
  full-batch gradient at ``x`` in a pass over its whole dataset before training (or, with
  ``full_batch_gradient=False``, reuses its first local step's minibatch gradient, taken at ``x``,
  at no extra cost); deltas may be clipped.
- Mime: local steps use ``g(y) - g(x) + c`` with ``c`` the cohort's full-batch gradient at ``x``,
  computed in a pass over the whole cohort before training.

The server sets ``x <- x - server_learning_rate * mean(x - y_i)`` and updates the optimizer state
with the cohort's full-batch gradient (gradients weighted by examples).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedtrain.aggregators import Aggregator, clip_by_norm, weighted_mean
from fedtrain.algorithms._common import grad_sum, safe_div, tree_add, tree_sub, tree_zeros
from fedtrain.algorithms.base import Algorithm, ClientOut, Prepass, check_nonnegative


class MimeState(NamedTuple):
    params: Any
    opt_state: Any


class MimeBroadcast(NamedTuple):
    params: Any
    opt_state: Any
    control: Any = ()  # Mime only: the cohort's full-batch gradient at params


class MimeLocal(NamedTuple):
    params: Any
    full_grad: Any  # MimeLite: (summed gradient at x, example count)


def _gradient_sum(bc, batch, ctx):
    return grad_sum(ctx.model, bc.params, batch)


def _build(name: str, base_tx: optax.GradientTransformation, server_learning_rate: float, full: bool,
           client_delta_clip_norm: float | None, aggregator: Aggregator | None,
           full_batch_gradient: bool = True) -> Algorithm:
    check_nonnegative(server_learning_rate=server_learning_rate)
    if client_delta_clip_norm is not None and not client_delta_clip_norm > 0:
        raise ValueError(f"client_delta_clip_norm must be > 0, got {client_delta_clip_norm}.")
    first_step_gradient = not full and not full_batch_gradient

    def init(params):
        return MimeState(params, base_tx.init(params))

    def broadcast(state, ctx):
        return MimeBroadcast(state.params, state.opt_state, tree_zeros(state.params) if full else ())

    def cohort(bc, total, ctx):
        g, n = total
        return bc._replace(control=jax.tree.map(lambda x: safe_div(x, n), g))

    def client_init(bc, client_state, full_grad, ctx):
        if first_step_gradient:
            full_grad = (tree_zeros(bc.params), jnp.zeros((), jnp.float32))
        return MimeLocal(bc.params, () if full else full_grad)

    def client_step(local, batch, ctx):
        bc = ctx.broadcast
        grads, sums = ctx.grad(local.params, batch)
        if first_step_gradient:  # the first step is taken at x: keep its gradient
            first = ctx.step == 0
            count = sums["loss"][1]
            local = local._replace(full_grad=(
                jax.tree.map(lambda a, g: jnp.where(first, g * count, a), local.full_grad[0], grads),
                jnp.where(first, count, local.full_grad[1])))
        if full:
            old, _ = ctx.grad(bc.params, batch)
            grads = tree_add(tree_sub(grads, old), bc.control)
        updates, _ = base_tx.update(grads, bc.opt_state, local.params)  # state stays frozen
        return local._replace(params=optax.apply_updates(local.params, updates)), sums

    def client_final(bc, local, ctx):
        delta = tree_sub(bc.params, local.params)
        if client_delta_clip_norm is not None:
            delta, _ = clip_by_norm(delta, client_delta_clip_norm)
        return ClientOut(delta, ctx.num_examples, stats=local.full_grad)

    def server_update(state, mean_delta, grad_stats, ctx):
        if full:  # the cohort's full-batch gradient, computed by the cohort prepass
            mean_grad = ctx.broadcast.control
        else:
            g, n = grad_stats
            mean_grad = jax.tree.map(lambda x: safe_div(x, n), g)
        _, opt_state = base_tx.update(mean_grad, state.opt_state, state.params)
        params = jax.tree.map(lambda p, d: p - server_learning_rate * d, state.params, mean_delta)
        return MimeState(params, opt_state), {}

    prepass = None if first_step_gradient else Prepass(_gradient_sum, cohort if full else None)
    hp = {"server_learning_rate": server_learning_rate, "client_delta_clip_norm": client_delta_clip_norm,
          "full_batch_gradient": full_batch_gradient}
    return Algorithm(name, init, client_init, client_step, client_final, server_update, broadcast,
                     prepass=prepass, aggregator=aggregator or weighted_mean(), hyperparams=hp)


def mime(base_tx: optax.GradientTransformation, server_learning_rate: float = 1.0, *,
         aggregator: Aggregator | None = None) -> Algorithm:
    """Mime: frozen-state ``base_tx`` steps on ``g(y) - g(x) + c`` (full-batch control variate ``c``)."""
    return _build("mime", base_tx, server_learning_rate, True, None, aggregator)


def mime_lite(base_tx: optax.GradientTransformation, server_learning_rate: float = 1.0, *,
              client_delta_clip_norm: float | None = None, full_batch_gradient: bool = True,
              aggregator: Aggregator | None = None) -> Algorithm:
    """MimeLite: frozen-state ``base_tx`` steps on plain minibatch gradients; optional delta clipping.
    ``full_batch_gradient=False`` feeds the server optimizer the clients' first-step minibatch
    gradients at ``x`` instead of full-batch ones (one gradient pass per client saved)."""
    return _build("mime_lite", base_tx, server_learning_rate, False, client_delta_clip_norm, aggregator,
                  full_batch_gradient)
