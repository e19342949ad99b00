"""HypCluster (Mansour et al., 2020, as in FedJAX): ``k`` cluster models; each client evaluates
every cluster model on its whole dataset, trains the one with the lowest loss, and each cluster model is
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
from fedtrain.algorithms._common import safe_div
from fedtrain.algorithms.base import Algorithm, ClientOut, Prepass, check_nonnegative


class HypClusterState(NamedTuple):
    params: Any  # stacked: every leaf has a leading axis of size k
    opt_state: Any  # one server optimizer state per cluster, stacked the same way


class HypClusterLocal(NamedTuple):
    params: Any
    opt_state: Any
    cluster: jax.Array


def cluster_params(state: HypClusterState, cluster: int) -> Any:
    """The model of one cluster."""
    return jax.tree.map(lambda x: x[cluster], state.params)


def _per_cluster(mask: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where ``mask[j]``, else ``old``, for trees stacked over clusters."""
    return jax.tree.map(lambda n, o: jnp.where(mask.reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new, old)


def hypcluster(client_tx: optax.GradientTransformation, num_clusters: int,
               server_tx: optax.GradientTransformation | None = None, *, init_noise: float = 0.01,
               seed: int = 0, aggregator: Aggregator | None = None) -> Algorithm:
    """HypCluster with ``num_clusters`` models, initialised as the given parameters plus
    ``N(0, init_noise^2)`` noise per cluster (cluster 0 unperturbed). Each cluster has its own
    ``server_tx`` state; a cluster no client chose keeps its model and its state."""
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
        return HypClusterState(stacked, jax.vmap(server_tx.init)(stacked))

    def cluster_losses(stacked, batch, ctx):  # the prepass: every cluster model's loss on the client's data
        return jax.vmap(lambda p: jnp.sum(ctx.example_losses(p, batch)[0]))(stacked)

    def client_init(stacked, client_state, losses, ctx):
        cluster = jnp.argmin(losses).astype(jnp.int32)
        params = jax.tree.map(lambda x: x[cluster], stacked)
        return HypClusterLocal(params, ctx.init_optimizer(client_tx, params), cluster)

    def client_step(local, batch, ctx):
        grads, sums = ctx.grad(local.params, batch)
        updates, opt_state = client_tx.update(grads, local.opt_state, local.params)
        return local._replace(params=optax.apply_updates(local.params, updates), opt_state=opt_state), sums

    def client_final(stacked, local, ctx):
        onehot = jax.nn.one_hot(local.cluster, k, dtype=jnp.float32)
        delta = jax.tree.map(lambda s, l: onehot.reshape((k,) + (1,) * l.ndim).astype(l.dtype)
                             * (s[local.cluster] - l)[None], stacked, local.params)
        return ClientOut((delta, onehot), ctx.num_examples, metrics={"cluster": local.cluster})

    def server_update(state, aggregate, stats, ctx):
        delta, share = aggregate  # per cluster: sum_i w_i [i chose j] delta_i / W and sum_i w_i [i chose j] / W
        mean_delta = jax.tree.map(lambda d: safe_div(d, share.reshape((k,) + (1,) * (d.ndim - 1))), delta)
        updates, opt_state = jax.vmap(server_tx.update)(mean_delta, state.opt_state, state.params)
        chosen = share > 0
        params = _per_cluster(chosen, optax.apply_updates(state.params, updates), state.params)
        metrics = {f"cluster_share_{j}": share[j] for j in range(k)}
        return HypClusterState(params, _per_cluster(chosen, opt_state, state.opt_state)), metrics

    return Algorithm("hypcluster", init, client_init, client_step, client_final, server_update,
                     params=lambda s: cluster_params(s, 0), prepass=Prepass(cluster_losses), aggregator=agg,
                     hyperparams={"num_clusters": k}, eval_models=lambda s: s.params)
