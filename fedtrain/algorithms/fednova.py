"""FedNova (Wang et al., NeurIPS 2020, "Tackling the Objective Inconsistency Problem in
Heterogeneous Federated Optimization").

Client ``i`` runs ``τ_i`` steps of SGD at rate ``η`` (heavy-ball momentum ``ρ``: ``v <- ρ v + g``,
``θ <- θ - η v``), so its update ``θ_server - θ_i`` weighs its gradients by a vector ``a_i`` with
``||a_i||_1 = Σ_{k=1}^{τ_i} (1 - ρ^k) / (1 - ρ)`` (``τ_i`` for plain SGD). It sends the normalized
update ``d_i = (θ_server - θ_i) / ||a_i||_1``; with ``p_i = n_i / Σ n`` the server takes
``τ_eff = Σ p_i ||a_i||_1`` and ``θ <- θ - server_lr τ_eff Σ p_i d_i``.

``d_i`` goes through the aggregator (``weighted_mean()``: weights ``n_i``); ``stats`` carry
``(n_i ||a_i||_1, n_i)``, whose cohort sums give ``τ_eff``. The client rate is injected
(``optax.inject_hyperparams``), so a client ``LearningRateScheduler`` reaches it.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from fedtrain.aggregators import Aggregator, weighted_mean
from fedtrain.algorithms._common import safe_div, tree_scale, tree_sub
from fedtrain.algorithms.base import Algorithm, ClientOut, check_nonnegative
from fedtrain.algorithms.fedopt import ServerState, fedopt


def fednova(client_learning_rate: float, server_learning_rate: float = 1.0, *, momentum: float = 0.0,
            server_tx: optax.GradientTransformation | None = None,
            aggregator: Aggregator | None = None) -> Algorithm:
    """FedNova with local SGD at ``client_learning_rate`` (heavy-ball ``momentum`` ρ) and server SGD at
    ``server_learning_rate`` (or ``server_tx``) on ``τ_eff Σ p_i d_i``."""
    check_nonnegative(client_learning_rate=client_learning_rate, server_learning_rate=server_learning_rate)
    rho = float(momentum)
    if not 0 <= rho < 1:
        raise ValueError(f"FedNova needs 0 <= momentum < 1, got {momentum}.")
    client_tx = optax.inject_hyperparams(optax.sgd, static_args=("momentum",))(
        learning_rate=float(client_learning_rate), momentum=rho or None)
    server_tx = server_tx or optax.sgd(server_learning_rate)

    def client_final(params, local, ctx):
        tau = jnp.asarray(ctx.num_steps, jnp.float32)
        a = tau if rho == 0 else (tau - rho * (1 - rho ** tau) / (1 - rho)) / (1 - rho)  # ||a_i||_1
        d = tree_scale(tree_sub(params, local.params), safe_div(1.0, a))
        n = jnp.asarray(ctx.num_examples, jnp.float32)
        return ClientOut(d, ctx.num_examples, stats=(n * a, n))

    def server_update(state, mean_d, stats, ctx):
        tau_eff = safe_div(stats[0], stats[1])  # Σ p_i ||a_i||_1
        updates, opt_state = server_tx.update(tree_scale(mean_d, tau_eff), state.opt_state, state.params)
        return ServerState(optax.apply_updates(state.params, updates), opt_state), {"tau_eff": tau_eff}

    # Local training is FedOpt's (local SGD from the broadcast model); the averaging is FedNova's.
    local_sgd = fedopt(client_tx, server_tx, aggregator=aggregator or weighted_mean())
    return local_sgd._replace(name="fednova", client_final=client_final, server_update=server_update,
                              hyperparams={"client_learning_rate": float(client_learning_rate),
                                  "server_learning_rate": server_learning_rate, "momentum": rho})
