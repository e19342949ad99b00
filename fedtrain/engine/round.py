"""The compiled round: local training of a whole cohort, aggregation and server update
in one XLA program.

Each lane walks its packed steps with a ``fori_loop`` whose trip count is the
number of steps actually used (a ``while`` loop on device), so the fixed-size
buffer never costs compute. At a client's first step the algorithm's
``client_init`` runs; at its last step ``client_final`` runs and its update is
added to the aggregator's running sum. Lanes run one after another (``scan``
backend, one lane) or side by side under ``vmap``; lane sums are added at the
end, so every backend computes the same sums. An aggregator that gathers (a
robust mean) instead gets each client's update written to its slot of a
``[lanes, slots, ...]`` buffer; only the aggregator's sides are summed.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedtrain.aggregators import global_norm
from fedtrain.algorithms.base import Algorithm, aggregator_state, with_aggregator_state
from fedtrain.engine.plan import partial_batch_buckets
from fedtrain.models.adapter import MASK_KEY, Model

PyTree = Any


class RoundOutput(NamedTuple):
    server_state: PyTree
    metric_sums: dict[str, tuple[jax.Array, jax.Array]]  # summed over the cohort
    client_metrics: dict[str, jax.Array]  # [L, S] per slot
    client_states: PyTree  # [L, S, ...] or None
    extras: dict[str, jax.Array]  # scalars: update_norm, aggregator and server metrics


def _tree_zeros(shapes: PyTree) -> PyTree:
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _tree_add(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(jnp.add, a, b)


def _index(tree: PyTree, i) -> PyTree:
    return jax.tree.map(lambda x: x[i], tree)


def _set(tree: PyTree, i, value: PyTree) -> PyTree:
    return jax.tree.map(lambda buf, v: buf.at[i].set(v.astype(buf.dtype)), tree, value)


def client_keys(round_key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Keys for client training, per-client aggregation, and the server, from a round's key."""
    train_key, contrib_key, server_key = jax.random.split(round_key, 3)
    return train_key, contrib_key, server_key


def _batch_at(features, mask, i, size=None):
    batch = {k: v[i] for k, v in features.items()}
    batch[MASK_KEY] = mask[i]
    return batch if size is None else {k: v[:size] for k, v in batch.items()}


def client_prepass(model: Model, algorithm: Algorithm, broadcast, features, mask, start, stop):
    """Folds ``algorithm.prepass.step`` over steps ``start .. stop-1`` (one client's batches)."""
    pre = algorithm.prepass
    return jax.lax.fori_loop(start, stop, lambda j, acc: pre.step(model, broadcast, acc, _batch_at(features, mask, j)),
                             pre.init(model, broadcast))


def make_cohort_prepass_fn(model: Model, algorithm: Algorithm):
    """``lane(broadcast, features, mask, first, last, num_steps) -> sum over the lane's clients``."""
    pre = algorithm.prepass

    def lane(broadcast, features, mask, first, last, num_steps):
        acc0 = pre.init(model, broadcast)

        def body(i, carry):
            acc, total = carry
            acc = jax.tree.map(lambda a, z: jnp.where(first[i], z, a), acc, acc0)
            acc = pre.step(model, broadcast, acc, _batch_at(features, mask, i))
            total = jax.tree.map(lambda t, a: t + jnp.where(last[i], a, jnp.zeros_like(a)), total, acc)
            return acc, total

        return jax.lax.fori_loop(0, num_steps, body, (acc0, jax.tree.map(jnp.zeros_like, acc0)))[1]

    return lane


def _client_ends(last: jax.Array) -> jax.Array:
    """For every step, one past the index of the last step of the client it belongs to."""
    idx = jnp.arange(last.shape[0])
    return jax.lax.cummin(jnp.where(last, idx, last.shape[0] - 1), reverse=True) + 1


def make_lane_fn(model: Model, algorithm: Algorithm, bucketed: bool):
    """``lane(broadcast, batch_lane, client_states_lane, keys, agg_state) -> (contribution_sum, per_slot)``.

    With ``bucketed`` (single lane), each step runs on the first ``partial_batch_buckets(B)[bucket]``
    examples of its batch, chosen by a device-side switch; the rest are padding.
    """
    per_client_prepass = algorithm.prepass is not None and algorithm.prepass.cohort is None
    gathers = algorithm.aggregator.gathers

    def lane(broadcast, features, mask, slot, first, last, bucket, num_steps, weights, positions, cstates,
             train_key, contrib_key, agg_state):
        def state_at(s):
            return None if cstates is None else _index(cstates, s)

        ends = _client_ends(last) if per_client_prepass else None

        def init_at(s, i=None):
            args = (model, broadcast, state_at(s), jax.random.fold_in(train_key, positions[s]))
            if per_client_prepass:
                acc = (algorithm.prepass.init(model, broadcast) if i is None
                       else client_prepass(model, algorithm, broadcast, features, mask, i, ends[i]))
                args = args + (acc,)
            return algorithm.client_init(*args)

        def batch_at(i, size=None):
            return _batch_at(features, mask, i, size)

        sizes = partial_batch_buckets(mask.shape[-1]) if bucketed else ()

        def step(local, i):
            if len(sizes) < 2:
                return algorithm.client_step(model, local, batch_at(i))
            branches = [lambda l, n=n: algorithm.client_step(model, l, batch_at(i, n)) for n in sizes]
            return jax.lax.switch(bucket[i], branches, local)

        local0 = init_at(0)
        step_sums_shape = jax.eval_shape(lambda l: algorithm.client_step(model, l, batch_at(0))[1], local0)
        out_shape = jax.eval_shape(lambda l: algorithm.client_final(model, broadcast, l, weights[0]), local0)
        contrib_shape = jax.eval_shape(
            lambda o: (algorithm.aggregator.contribution(o.update, o.weight, contrib_key, agg_state), o.stats),
            out_shape)
        num_slots = weights.shape[0]
        per_slot0 = {
            "metric_sums": jax.tree.map(lambda s: jnp.zeros((num_slots,), s.dtype), step_sums_shape),
            "update_norm": jnp.zeros((num_slots,), jnp.float32),
            "extras": jax.tree.map(lambda s: jnp.zeros((num_slots,) + s.shape, s.dtype), out_shape.metrics),
            "client_states": cstates,
        }
        if gathers:  # each client's (update, weight) goes to its slot; only the sides are summed
            (part_shape, sides_shape), stats_shape = contrib_shape
            per_slot0["gathered"] = jax.tree.map(lambda s: jnp.zeros((num_slots,) + s.shape, s.dtype), part_shape)
            contrib_shape = (((), sides_shape), stats_shape)
        carry0 = (local0, _tree_zeros(step_sums_shape), _tree_zeros(contrib_shape), per_slot0)

        def body(i, carry):
            local, sums, contrib, per_slot = carry
            s = slot[i]
            local = jax.lax.cond(first[i], lambda: init_at(s, i), lambda: local)
            sums = jax.tree.map(lambda m: jnp.where(first[i], jnp.zeros_like(m), m), sums)
            local, step_sums = step(local, i)
            sums = _tree_add(sums, step_sums)

            def finish(args):
                contrib, per_slot = args
                out = algorithm.client_final(model, broadcast, local, weights[s])
                c = (algorithm.aggregator.contribution(out.update, out.weight,
                                                       jax.random.fold_in(contrib_key, positions[s]), agg_state),
                     out.stats)
                per_slot = dict(per_slot)
                per_slot["metric_sums"] = _set(per_slot["metric_sums"], s, sums)
                per_slot["update_norm"] = per_slot["update_norm"].at[s].set(global_norm(out.update))
                per_slot["extras"] = _set(per_slot["extras"], s, out.metrics)
                if cstates is not None:
                    per_slot["client_states"] = _set(per_slot["client_states"], s, out.client_state)
                if gathers:
                    (part, sides), stats = c
                    per_slot["gathered"] = _set(per_slot["gathered"], s, part)
                    c = (((), sides), stats)
                return _tree_add(contrib, c), per_slot

            contrib, per_slot = jax.lax.cond(last[i], finish, lambda args: args, (contrib, per_slot))
            return local, sums, contrib, per_slot

        _, _, contrib, per_slot = jax.lax.fori_loop(0, num_steps, body, carry0)
        return contrib, per_slot

    return lane


CLIENT_AXIS = "clients"


def map_lanes(lanes: int, mesh=None, group: int | None = None):
    """``run(f, lane_args, shared) -> (sum over lanes, per-lane outputs stacked)``.

    ``f(*one_lane_args, *shared) -> (summed, stacked)``. One lane runs as is,
    several are vmapped; more than ``group`` lanes run as a ``scan`` over groups
    of ``group`` vmapped lanes, so activation memory is bounded by the group,
    not the cohort. With a ``mesh`` the lane axis is split over its devices
    (``shard_map``), each device runs its lanes and the sums are all-reduced
    across devices (and hosts) inside the same program.
    """

    def vmapped(f, lane_args, shared):
        in_axes = (0,) * len(lane_args) + (None,) * len(shared)
        summed, stacked = jax.vmap(f, in_axes=in_axes)(*lane_args, *shared)
        return jax.tree.map(lambda x: jnp.sum(x, axis=0), summed), stacked

    def local(f, lane_args, shared):
        n = jax.tree.leaves(lane_args)[0].shape[0]
        if n == 1:
            summed, stacked = f(*_index(lane_args, 0), *shared)
            return summed, jax.tree.map(lambda x: x[None], stacked)
        if group is None or n <= group:
            return vmapped(f, lane_args, shared)
        if n % group:
            raise ValueError(f"{n} lanes are not a multiple of the lane group {group}.")
        grouped = jax.tree.map(lambda x: x.reshape((n // group, group) + x.shape[1:]), lane_args)
        first = jax.tree.map(lambda x: x[0], grouped)
        zeros = _tree_zeros(jax.eval_shape(lambda a: vmapped(f, a, shared)[0], first))

        def body(total, chunk):
            summed, stacked = vmapped(f, chunk, shared)
            return _tree_add(total, summed), stacked

        total, stacked = jax.lax.scan(body, zeros, grouped)
        return total, jax.tree.map(lambda x: x.reshape((n,) + x.shape[2:]), stacked)

    if mesh is None:
        return local
    from jax.sharding import PartitionSpec

    def sharded(f, lane_args, shared):
        def per_device(lane_args, shared):
            summed, stacked = local(f, lane_args, shared)
            return jax.lax.psum(summed, CLIENT_AXIS), stacked

        return jax.shard_map(per_device, mesh=mesh, in_specs=(PartitionSpec(CLIENT_AXIS), PartitionSpec()),
                             out_specs=(PartitionSpec(), PartitionSpec(CLIENT_AXIS)),
                             check_vma=False)(tuple(lane_args), tuple(shared))

    return sharded


def make_round_fn(model: Model, algorithm: Algorithm, lanes: int, on_trace=None, mesh=None,
                  lane_group: int | None = None):
    """The whole round as one function of (server_state, batch, client_states, round_key).

    With a ``mesh``, ``lanes`` is a multiple of its size and each device runs ``lanes / size`` lanes;
    lanes run in groups of at most ``lane_group`` (see :func:`map_lanes`).
    """
    lanes_per_device = lanes // mesh.size if mesh is not None else lanes
    lane = make_lane_fn(model, algorithm, bucketed=lanes_per_device == 1)
    run_lanes = map_lanes(lanes, mesh, lane_group)
    cohort_prepass = algorithm.prepass is not None and algorithm.prepass.cohort is not None

    def round_fn(server_state, batch, client_states, round_key):
        if on_trace is not None:
            on_trace()
        broadcast = algorithm.broadcast(server_state)
        agg_state = aggregator_state(algorithm, server_state)
        train_key, contrib_key, server_key = client_keys(round_key)
        if cohort_prepass:
            pre_lane = make_cohort_prepass_fn(model, algorithm)
            pre_args = (batch.features, batch.mask, batch.first, batch.last, batch.num_steps)
            total, _ = run_lanes(lambda *a: (pre_lane(a[-1], *a[:-1]), ()), pre_args, (broadcast,))
            broadcast = algorithm.prepass.cohort(broadcast, total)
        args = (batch.features, batch.mask, batch.slot, batch.first, batch.last, batch.bucket, batch.num_steps,
                batch.weights, batch.positions, client_states)

        def one_lane(*a):
            *lane_args, broadcast_, train_key_, contrib_key_, agg_state_ = a
            return lane(broadcast_, *lane_args, train_key_, contrib_key_, agg_state_)

        contrib, per_slot = run_lanes(one_lane, args, (broadcast, train_key, contrib_key, agg_state))
        return finish_round(algorithm, server_state, contrib, per_slot, server_key)

    return round_fn


def finish_round(algorithm: Algorithm, server_state, contrib, per_slot, server_key) -> RoundOutput:
    """Aggregates the summed contributions and applies the server update. For an aggregator that
    gathers, ``per_slot['gathered']`` holds every slot's ``(update, weight)`` ([lanes, slots, ...],
    weight 0 in empty slots), handed to ``finalize`` as one client axis."""
    contrib, stats = contrib
    if algorithm.aggregator.gathers:
        gathered = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), per_slot["gathered"])
        contrib = (gathered, contrib[1])
    aggregate, agg_state, agg_metrics = algorithm.aggregator.finalize(
        contrib, server_key, aggregator_state(algorithm, server_state))
    if jax.tree.leaves(stats):
        new_state, server_metrics = algorithm.server_update(server_state, aggregate, stats)
    else:
        new_state, server_metrics = algorithm.server_update(server_state, aggregate)
    new_state = with_aggregator_state(algorithm, new_state, agg_state)
    metric_sums = jax.tree.map(jnp.sum, per_slot["metric_sums"])
    client_metrics = {"update_norm": per_slot["update_norm"]}
    for name, (total, count) in per_slot["metric_sums"].items():
        client_metrics[f"{name}_sum"] = total
        client_metrics[f"{name}_count"] = count
    client_metrics.update(per_slot["extras"])
    extras = {"update_norm": global_norm(aggregate), **agg_metrics, **server_metrics}
    return RoundOutput(new_state, metric_sums, client_metrics, per_slot["client_states"], extras)
