"""Mime and MimeLite (Karimireddy et al., 2020): clients apply the server's base optimizer with its
state (momentum, Adam moments, ...) frozen; only the server updates that state, from the mean
full-batch gradient of the cohort at the broadcast model.

- MimeLite: local steps use the plain minibatch gradient ``g(y)``. Each client computes its
  full-batch gradient at ``x`` in a pass over its batches before training (or, with
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
import optax

from fedtrain.aggregators import Aggregator, clip_by_norm, weighted_mean
from fedtrain.algorithms._common import grad_sum, safe_div, tree_add, tree_scale, tree_sub, tree_zeros
from fedtrain.algorithms.base import Algorithm, ClientOut, Prepass, check_nonnegative
from fedtrain.models.adapter import grad_and_metrics


class MimeState(NamedTuple):
    params: Any
    opt_state: Any
    aggregator: Any = ()


class MimeBroadcast(NamedTuple):
    params: Any
    opt_state: Any
    control: Any = ()  # Mime only: the cohort's full-batch gradient at params


class MimeLocal(NamedTuple):
    params: Any
    rng: jax.Array
    full_grad: Any  # MimeLite: (summed gradient at x, example count)
    bc: MimeBroadcast


def _gradient_pass() -> Prepass:
    def init(model, bc):
        del model
        return tree_zeros(bc.params), jax.numpy.zeros((), jax.numpy.float32)

    def step(model, bc, acc, batch):
        g, n = grad_sum(model, bc.params, batch)
        return tree_add(acc[0], g), acc[1] + n

    return Prepass(init, step)


def _build(name: str, base_tx: optax.GradientTransformation, server_learning_rate: float, full: bool,
           client_delta_clip_norm: float | None, aggregator: Aggregator | None,
           full_batch_gradient: bool = True) -> Algorithm:
    check_nonnegative(server_learning_rate=server_learning_rate)
    if client_delta_clip_norm is not None and not client_delta_clip_norm > 0:
        raise ValueError(f"client_delta_clip_norm must be > 0, got {client_delta_clip_norm}.")
    agg = aggregator or weighted_mean()
    gradient_pass = _gradient_pass()

    def init(params):
        return MimeState(params, base_tx.init(params), agg.init(params) if agg.stateful else ())

    def broadcast(state):
        return MimeBroadcast(state.params, state.opt_state, tree_zeros(state.params) if full else ())

    def cohort(bc, total):
        g, n = total
        return bc._replace(control=jax.tree.map(lambda x: safe_div(x, n), g))

    def client_init(model, bc, client_state, rng, *prepass):
        del model, client_state
        if full:
            return MimeLocal(bc.params, rng, (), bc)
        if full_batch_gradient:
            return MimeLocal(bc.params, rng, prepass[0], bc)
        return MimeLocal(bc.params, rng, (tree_zeros(bc.params), jax.numpy.zeros((), jax.numpy.float32)), bc)

    def client_step(model, local, batch):
        bc = local.bc
        rng, step_rng = jax.random.split(local.rng)
        grads, sums = grad_and_metrics(model, local.params, batch, step_rng)
        if not full and not full_batch_gradient:  # the first step is taken at x: keep its gradient
            first = local.full_grad[1] == 0
            count = sums["loss"][1]
            local = local._replace(full_grad=(
                jax.tree.map(lambda a, g: jax.numpy.where(first, g * count, a), local.full_grad[0], grads),
                jax.numpy.where(first, count, local.full_grad[1])))
        if full:
            old, _ = grad_and_metrics(model, bc.params, batch, step_rng)
            grads = tree_add(tree_sub(grads, old), bc.control)
        updates, _ = base_tx.update(grads, bc.opt_state, local.params)  # state stays frozen
        return local._replace(params=optax.apply_updates(local.params, updates), rng=rng), sums

    def client_final(model, bc, local, num_examples):
        del model
        delta = tree_sub(bc.params, local.params)
        if client_delta_clip_norm is not None:
            delta, _ = clip_by_norm(delta, client_delta_clip_norm)
        if full:  # the server's gradient is the cohort control variate, reported with this client's weight
            stats = (tree_scale(bc.control, num_examples), num_examples)
        else:
            stats = local.full_grad
        return ClientOut(delta, num_examples, stats=stats)

    def server_update(state, mean_delta, grad_stats):
        g, n = grad_stats
        mean_grad = jax.tree.map(lambda x: safe_div(x, n), g)
        _, opt_state = base_tx.update(mean_grad, state.opt_state, state.params)
        params = jax.tree.map(lambda p, d: p - server_learning_rate * d, state.params, mean_delta)
        return state._replace(params=params, opt_state=opt_state), {}

    prepass = Prepass(gradient_pass.init, gradient_pass.step, cohort if full else None)
    if not full and not full_batch_gradient:
        prepass = None
    hp = {"server_learning_rate": server_learning_rate, "client_delta_clip_norm": client_delta_clip_norm,
          "full_batch_gradient": full_batch_gradient}
    return Algorithm(name, init, broadcast, client_init, client_step, client_final, server_update,
                     lambda s: s.params, agg, hyperparams=hp, prepass=prepass)


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
