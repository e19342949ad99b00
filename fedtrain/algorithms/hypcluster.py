"""HypCluster (Mansour et al., 2020, as in FedJAX): ``k`` cluster models; each client evaluates
every cluster model on its batches, trains the one with the lowest loss, and each cluster model is
updated with the weighted mean delta of the clients that chose it (unchosen clusters stay put).

Evaluation (``trainer.evaluate``) gives each client the cluster model with the lowest loss on its
training data (on its evaluation data when the trainer has none for it), as FedJAX's
``HypClusterEvaluator``; ``params(state)`` is cluster 0's model and :func:`cluster_params` any cluster's.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedtrain.aggregators import Aggregator, weighted_mean
from fedtrain.algorithms._common import example_losses, safe_div
from fedtrain.algorithms.base import Algorithm, ClientOut, Prepass, check_nonnegative
from fedtrain.models.adapter import grad_and_metrics


class HypClusterState(NamedTuple):
    params: Any  # stacked: every leaf has a leading axis of size k
    opt_state: Any
    aggregator: Any = ()


class HypClusterLocal(NamedTuple):
    params: Any
    opt_state: Any
    rng: jax.Array
    cluster: jax.Array


def cluster_params(state: HypClusterState, cluster: int) -> Any:
    """The model of one cluster."""
    return jax.tree.map(lambda x: x[cluster], state.params)


def hypcluster(client_tx: optax.GradientTransformation, num_clusters: int,
               server_tx: optax.GradientTransformation | None = None, *, init_noise: float = 0.01,
               seed: int = 0, aggregator: Aggregator | None = None) -> Algorithm:
    """HypCluster with ``num_clusters`` models, initialised as the given parameters plus
    ``N(0, init_noise^2)`` noise per cluster (cluster 0 unperturbed)."""
    k = int(num_clusters)
    if k < 1:
        raise ValueError(f"num_clusters must be >= 1, got {num_clusters}.")
    check_nonnegative(init_noise=init_noise)
    server_tx = server_tx or optax.sgd(1.0)
    agg = aggregator or weighted_mean()
    if agg.gathers:
        raise ValueError(f"hypcluster cannot use the coordinate-wise aggregator {agg.name!r}: each client's update "
                         "is zero for the clusters it did not choose, so a per-coordinate median or trimmed mean "
                         "over clients would mix chosen and unchosen clusters. Use a mean aggregator.")

    def init(params):
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(seed), len(leaves))
        stacked = []
        for x, key in zip(leaves, keys):
            noise = init_noise * jax.random.normal(key, (k,) + x.shape, jnp.float32)
            stacked.append(x[None] + noise.at[0].set(0).astype(x.dtype))
        stacked = jax.tree.unflatten(treedef, stacked)
        return HypClusterState(stacked, server_tx.init(stacked), agg.init(stacked) if agg.stateful else ())

    def pre_init(model, stacked):
        del model, stacked
        return jnp.zeros((k,), jnp.float32), jnp.zeros((), jnp.float32)

    def pre_step(model, stacked, acc, batch):
        losses, counts = jax.vmap(lambda p: [jnp.sum(v) for v in example_losses(model, p, batch)[:2]])(stacked)
        return acc[0] + losses, acc[1] + counts[0]

    def client_init(model, stacked, client_state, rng, losses):
        del model, client_state
        cluster = jnp.argmin(losses[0]).astype(jnp.int32)
        params = jax.tree.map(lambda x: x[cluster], stacked)
        return HypClusterLocal(params, client_tx.init(params), rng, cluster)

    def client_step(model, local, batch):
        rng, step_rng = jax.random.split(local.rng)
        grads, sums = grad_and_metrics(model, local.params, batch, step_rng)
        updates, opt_state = client_tx.update(grads, local.opt_state, local.params)
        return local._replace(params=optax.apply_updates(local.params, updates), opt_state=opt_state, rng=rng), sums

    def client_final(model, stacked, local, num_examples):
        del model
        onehot = jax.nn.one_hot(local.cluster, k, dtype=jnp.float32)
        delta = jax.tree.map(lambda s, l: onehot.reshape((k,) + (1,) * l.ndim).astype(l.dtype)
                             * (s[local.cluster] - l)[None], stacked, local.params)
        return ClientOut((delta, onehot), num_examples, metrics={"cluster": local.cluster})

    def server_update(state, aggregate):
        delta, share = aggregate  # per cluster: sum_i w_i [i chose j] delta_i / W and sum_i w_i [i chose j] / W
        mean_delta = jax.tree.map(lambda d: safe_div(d, share.reshape((k,) + (1,) * (d.ndim - 1))), delta)
        updates, opt_state = server_tx.update(mean_delta, state.opt_state, state.params)
        chosen = share > 0
        updates = jax.tree.map(lambda u: u * chosen.reshape((k,) + (1,) * (u.ndim - 1)).astype(u.dtype), updates)
        metrics = {f"cluster_share_{j}": share[j] for j in range(k)}
        return state._replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state), metrics

    return Algorithm("hypcluster", init, lambda s: s.params, client_init, client_step, client_final, server_update,
                     lambda s: cluster_params(s, 0), agg, prepass=Prepass(pre_init, pre_step),
                     hyperparams={"num_clusters": k}, eval_models=lambda s: s.params)
