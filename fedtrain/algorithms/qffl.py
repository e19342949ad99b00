"""q-FFL solved by q-FedAvg (Li, Sanjabi, Beirami, Smith, ICLR 2020, "Fair Resource Allocation in
Federated Learning", Algorithm 2).

Each client measures its mean loss ``F_k`` at the broadcast ``w^t`` over its whole dataset (a
prepass), trains ``client_tx`` from ``w^t`` to ``w_k`` and computes ``Δw_k = L (w^t - w_k)``,
``Δ_k = F_k^q Δw_k`` and ``h_k = q F_k^(q-1) ||Δw_k||^2 + L F_k^q``. The server sets
``w^{t+1} = w^t - Σ_k Δ_k / Σ_k h_k``.

``Δ_k`` goes through the aggregator, a uniform mean over the cohort (default ``mean()``), whose
result times ``|S|`` is ``Σ_k Δ_k``; ``h_k`` is summed in ``stats``. With ``q = 0`` the rule is
``w^{t+1} = mean_k w_k``: FedAvg with uniform client weights and server rate 1, for any ``L``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedtrain.aggregators import Aggregator, global_norm, mean
from fedtrain.algorithms._common import safe_div, tree_scale, tree_sub
from fedtrain.algorithms.base import Algorithm, ClientOut, Prepass


class QFFLState(NamedTuple):
    params: Any


class QFFLLocal(NamedTuple):
    params: Any
    opt_state: Any
    loss: jax.Array  # F_k(w^t)


def qffl(client_tx: optax.GradientTransformation, q: float, lipschitz: float, *,
         aggregator: Aggregator | None = None) -> Algorithm:
    """q-FedAvg with fairness exponent ``q >= 0`` and Lipschitz constant ``lipschitz`` (the paper's
    ``L > 0``; its experiments use ``1 / client learning rate``)."""
    q_f, lip = float(q), float(lipschitz)
    if not 0 <= q_f < float("inf"):
        raise ValueError(f"qffl needs a finite q >= 0 (q = 0 is FedAvg with uniform client weights; larger q is "
                         f"fairer); got {q}.")
    if not 0 < lip < float("inf"):
        raise ValueError(f"qffl needs a finite lipschitz (the paper's L) > 0, e.g. 1 / client learning rate; "
                         f"got {lipschitz}.")

    def init(params):
        return QFFLState(params)

    def loss_sums(params, batch, ctx):  # the prepass: F_k's sum and count at the broadcast model
        losses, counts, _ = ctx.example_losses(params, batch)
        return jnp.sum(losses), jnp.sum(counts)

    def client_init(params, client_state, sums, ctx):
        return QFFLLocal(params, ctx.init_optimizer(client_tx, params), safe_div(sums[0], sums[1]))

    def client_step(local, batch, ctx):
        grads, sums = ctx.grad(local.params, batch)
        updates, opt_state = client_tx.update(grads, local.opt_state, local.params)
        return local._replace(params=optax.apply_updates(local.params, updates), opt_state=opt_state), sums

    def client_final(params, local, ctx):
        dw = tree_scale(tree_sub(params, local.params), lip)  # Δw_k = L (w^t - w_k)
        f = local.loss
        fq = jnp.ones_like(f) if q_f == 0 else f ** q_f
        h = lip * fq
        if q_f != 0:
            h = h + q_f * f ** (q_f - 1) * global_norm(dw) ** 2
        return ClientOut(tree_scale(dw, fq), jnp.ones((), jnp.float32), stats=h, metrics={"broadcast_loss": f})

    def server_update(state, mean_delta, h_sum, ctx):
        step = tree_scale(mean_delta, safe_div(ctx.cohort_size, h_sum))  # Σ_k Δ_k / Σ_k h_k
        return QFFLState(tree_sub(state.params, step)), {"h_sum": h_sum}

    return Algorithm("qffl", init, client_init, client_step, client_final, server_update,
                     prepass=Prepass(loss_sums), aggregator=aggregator or mean(),
                     hyperparams={"q": q_f, "lipschitz": lip})
