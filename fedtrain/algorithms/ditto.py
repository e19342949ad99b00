"""Ditto (Li, Hu, Beirami, Smith, ICML 2021, "Ditto: Fair and Robust Federated Learning Through
Personalization"), Algorithm 1.

The global model ``w`` is trained as FedAvg: clients run ``client_tx`` from the broadcast ``w^t``,
the weighted mean of their deltas ``w^t - w_k`` goes to ``server_tx``. Each client also keeps a
personal model ``v_k`` (its client state) and, each round it participates, takes ``personal_steps``
steps of ``personal_tx`` on ``F_k(v) + lam/2 ||v - w^t||^2``.

Both models step inside the same local steps: local step ``j`` takes one step of ``w`` and, while
``j < personal_steps``, one step of ``v_k``, on the same batch (so ``personal_steps`` above the
round's local steps is the local steps). ``v_k`` starts as the broadcast model of the client's first
round; the client state ``(params, rounds)`` counts its rounds, so a never-trained client is evaluated
on the global model (``personal_params``). The personal optimizer restarts every round.
Step logs add ``personal_loss`` (and every metric as ``personal_<name>``) of ``v_k`` before its steps.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedtrain.aggregators import Aggregator, weighted_mean
from fedtrain.algorithms._common import tree_sub
from fedtrain.algorithms.base import Algorithm, ClientOut
from fedtrain.algorithms.fedopt import ServerState


class DittoClientState(NamedTuple):
    params: Any  # v_k
    rounds: jax.Array  # int32: rounds the client has trained (0: v_k not started yet)


class DittoLocal(NamedTuple):
    params: Any  # w_k
    opt_state: Any
    personal: Any  # v_k
    personal_opt_state: Any
    rounds: jax.Array


def _where(cond, a, b):
    return jax.tree.map(lambda x, y: jnp.where(cond, x, y), a, b)


def personal_model(state: ServerState, client_state: DittoClientState) -> Any:
    """The client's personal model ``v_k``; the global model for a client that never trained."""
    return _where(client_state.rounds > 0, client_state.params, state.params)


def ditto(client_tx: optax.GradientTransformation, lam: float, server_tx: optax.GradientTransformation | None = None,
          *, personal_tx: optax.GradientTransformation | None = None, personal_steps: int | None = None,
          aggregator: Aggregator | None = None) -> Algorithm:
    """Ditto with FedAvg/FedOpt on the global model (``client_tx``, ``server_tx``, default SGD at rate 1)
    and personal models pulled towards it with strength ``lam`` (``personal_tx`` defaults to
    ``client_tx``; ``personal_steps=None`` steps on every local batch)."""
    lam_f = float(lam)
    if not 0 <= lam_f < float("inf"):
        raise ValueError(f"ditto needs lam (the paper's lambda, the pull of each personal model towards the global "
                         f"one) to be a finite number >= 0; got {lam}. lam=0 trains the personal models locally only.")
    if personal_steps is not None and (isinstance(personal_steps, bool) or not isinstance(personal_steps, int)
                                       or personal_steps < 1):
        raise ValueError(f"ditto needs personal_steps to be an int >= 1 (personal SGD steps per round) or None "
                         f"(one per local step); got {personal_steps!r}.")
    server_tx = server_tx or optax.sgd(1.0)
    personal_tx = personal_tx or client_tx

    def init(params):
        return ServerState(params, server_tx.init(params))

    def client_state_init(params):
        return DittoClientState(params, jnp.zeros((), jnp.int32))

    def client_init(params, cs, prepass, ctx):
        personal = _where(cs.rounds > 0, cs.params, params)
        return DittoLocal(params, ctx.init_optimizer(client_tx, params), personal,
                          ctx.init_optimizer(personal_tx, personal), cs.rounds)

    def client_step(local, batch, ctx):
        grads, sums = ctx.grad(local.params, batch)
        updates, opt_state = client_tx.update(grads, local.opt_state, local.params)
        params = optax.apply_updates(local.params, updates)
        pctx = ctx if ctx.rng is None else ctx._replace(rng=jax.random.fold_in(ctx.rng, 1))
        pgrads, psums = pctx.grad(local.personal, batch)
        pgrads = jax.tree.map(lambda g, v, w: g + lam_f * (v - w), pgrads, local.personal, ctx.broadcast)
        pupdates, popt_state = personal_tx.update(pgrads, local.personal_opt_state, local.personal)
        personal = optax.apply_updates(local.personal, pupdates)
        if personal_steps is not None:
            active = ctx.step < personal_steps
            personal, popt_state = _where(active, (personal, popt_state), (local.personal, local.personal_opt_state))
            psums = jax.tree.map(lambda s: jnp.where(active, s, jnp.zeros_like(s)), psums)
        sums = {**sums, **{f"personal_{k}": v for k, v in psums.items()}}
        return DittoLocal(params, opt_state, personal, popt_state, local.rounds), sums

    def client_final(params, local, ctx):
        return ClientOut(tree_sub(params, local.params), ctx.num_examples,
                         DittoClientState(local.personal, local.rounds + 1))

    def server_update(state, mean_delta, stats, ctx):
        updates, opt_state = server_tx.update(mean_delta, state.opt_state, state.params)
        return ServerState(optax.apply_updates(state.params, updates), opt_state), {}

    return Algorithm("ditto", init, client_init, client_step, client_final, server_update,
                     client_state_init=client_state_init, aggregator=aggregator or weighted_mean(),
                     personal_params=personal_model,
                     hyperparams={"lam": lam_f, "personal_steps": personal_steps})
