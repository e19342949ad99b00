"""FedDyn (Acar et al., ICLR 2021, "Federated Learning Based on Dynamic Regularization").

Each client ``i`` keeps ``g_i`` (its last local gradient, zero at first) and minimises
``L_i(θ) - <g_i, θ> + α/2 ||θ - θ_server||²``; after training ``g_i <- g_i - α (θ_i - θ_server)``.
The server keeps ``h <- h - α/N Σ_{i∈S} (θ_i - θ_server)`` (``N`` the population) and sets
``θ_server <- mean_{i∈S} θ_i - h/α``.

Clients send the delta ``θ_server - θ_i`` through the aggregator (uniform ``mean()``, as in the
paper); the cohort's ``Σ (θ_i - θ_server)`` is then ``-|S| * mean_delta`` (``|S|`` is
``ctx.cohort_size``), so every per-client value reaches the server through the aggregator
(clipping, noise or a robust mean apply to ``h`` as well).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from fedtrain.aggregators import Aggregator, mean
from fedtrain.algorithms._common import tree_add, tree_scale, tree_sub, tree_zeros
from fedtrain.algorithms.base import Algorithm, ClientOut


class FedDynState(NamedTuple):
    params: Any  # θ_server
    h: Any


class FedDynLocal(NamedTuple):
    params: Any  # θ
    opt_state: Any
    grad_state: Any  # g_i, fixed during local training


def feddyn(client_tx: optax.GradientTransformation, alpha: float, *, aggregator: Aggregator | None = None) -> Algorithm:
    """FedDyn with ``client_tx`` minimising the dynamically regularised local objective at coefficient ``alpha``."""
    if not 0 < float(alpha) < float("inf"):
        raise ValueError(f"FedDyn needs a finite alpha > 0 (the server divides h by it), got {alpha}.")
    alpha = float(alpha)

    def init(params):
        return FedDynState(params, tree_zeros(params))

    def client_init(params, grad_state, prepass, ctx):
        return FedDynLocal(params, ctx.init_optimizer(client_tx, params), grad_state)

    def client_step(local, batch, ctx):
        grads, sums = ctx.grad(local.params, batch)  # ∇L_i(θ) - g_i + α (θ - θ_server)
        grads = jax.tree.map(lambda d, g, w, s: d - g + alpha * (w - s), grads, local.grad_state, local.params,
                             ctx.broadcast)
        updates, opt_state = client_tx.update(grads, local.opt_state, local.params)
        return local._replace(params=optax.apply_updates(local.params, updates), opt_state=opt_state), sums

    def client_final(params, local, ctx):
        delta = tree_sub(params, local.params)  # θ_server - θ_i
        grad_state = tree_add(local.grad_state, tree_scale(delta, alpha))  # g_i - α (θ_i - θ_server)
        return ClientOut(delta, ctx.num_examples, grad_state)

    def server_update(state, mean_delta, stats, ctx):
        # h - α/N Σ_{i∈S} (θ_i - θ_server) = h + α |S|/N mean_delta
        h = tree_add(state.h, tree_scale(mean_delta, alpha * ctx.cohort_size / ctx.num_clients))
        # mean_{i∈S} θ_i - h/α = θ_server - mean_delta - h/α
        params = tree_sub(tree_sub(state.params, mean_delta), tree_scale(h, 1.0 / alpha))
        return FedDynState(params, h), {}

    return Algorithm("feddyn", init, client_init, client_step, client_final, server_update,
                     client_state_init=tree_zeros, aggregator=aggregator or mean(), hyperparams={"alpha": alpha})
