"""The compiled round: a cohort's local training, aggregation and server update in one XLA program.

Inside a lane, clients run one after another (a ``scan`` over the lane's slots); each client
runs, once, its prepass (a loop over its prepass batches), ``client_init``, a loop over exactly
its local steps, and ``client_final``. Lanes run side by side under ``vmap`` (and over devices
with ``shard_map``); then the per-step body under ``vmap`` is only the step. Contributions are
summed within a lane, over lanes and over devices, so every backend computes the same sums. An
aggregator that gathers (a robust mean) instead gets every slot's ``(update, weight)``.

The same per-client function runs eagerly, one step at a time, for the ``debug`` backend.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedtrain.aggregators import global_norm
from fedtrain.algorithms.base import SIGNATURES, Algorithm, Context
from fedtrain.engine.plan import RoundArrays
from fedtrain.models.adapter import MASK_KEY

PyTree = Any
CLIENT_AXIS = "clients"


class SlotOutputs(NamedTuple):
    """Per-slot results of a round (leading axes ``[lanes, slots]``)."""

    metric_sums: dict[str, tuple[jax.Array, jax.Array]]  # the client's summed step metrics
    update_norm: jax.Array
    metrics: dict[str, jax.Array]  # ClientOut.metrics
    client_state: PyTree  # the client's new state (None for stateless algorithms)
    gathered: PyTree  # (update, weight) for gathering aggregators, else ()


class RoundOutputs(NamedTuple):
    server_state: PyTree
    aggregator_state: PyTree
    slots: SlotOutputs
    metrics: dict[str, jax.Array]  # scalars: update_norm, aggregator and server metrics


def round_keys(round_key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Keys for client training, per-client aggregation, and the server, from a round's key."""
    train_key, contrib_key, server_key = jax.random.split(round_key, 3)
    return train_key, contrib_key, server_key


def client_keys(train_key: jax.Array, position) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Keys of one client (by cohort position): ``client_init``, local steps, ``client_final``."""
    keys = jax.random.split(jax.random.fold_in(train_key, position), 3)
    return keys[0], keys[1], keys[2]


def _renamed(e: Exception, message: str) -> Exception:
    try:
        new = type(e)(message)
    except Exception:
        new = RuntimeError(message)
    new._fedtrain_named = True  # type: ignore[attr-defined]
    return new


class Calls:
    """Calls the algorithm's functions; an exception names the function and its contract."""

    def __init__(self, algorithm: Algorithm):
        self.algorithm = algorithm

    def __call__(self, field: str, fn: Callable, *args):
        try:
            return fn(*args)
        except Exception as e:
            if getattr(e, "_fedtrain_named", False):
                raise
            raise _renamed(e, f"algorithm {self.algorithm.name!r}, {field}: {type(e).__name__}: {e} "
                              f"(contract: {SIGNATURES[field]})") from e


def batch_at(features: dict, mask: jax.Array, i, size: int | None = None) -> dict:
    batch = {k: v[i] for k, v in features.items()}
    batch[MASK_KEY] = mask[i]
    if size is not None:
        batch = {k: v[:size] for k, v in batch.items()}
    return batch


def fori(n, body, init, what: str = ""):
    del what
    return jax.lax.fori_loop(0, n, body, init)


class ClientRound:
    """One client's part of a round: prepass, ``client_init``, local steps, ``client_final``.

    ``loop(n, body, init)`` runs the loops (``fori_loop`` when compiled, a Python loop for ``debug``).
    """

    def __init__(self, algorithm: Algorithm, buckets: tuple[int, ...], batch_size: int, loop=fori):
        self.alg, self.call, self.loop = algorithm, Calls(algorithm), loop
        self.sizes = tuple(sorted(set(buckets) | {int(batch_size)})) if buckets else ()

    def prepass(self, a: RoundArrays, start, count, ctx: Context):
        """The prepass sums over one client's prepass batches (zeros for an empty slot)."""
        step = self.alg.prepass.step
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(
            lambda: self.call("prepass.step", step, ctx.broadcast, batch_at(a.pre_features, a.pre_mask, 0), ctx)))

        def body(j, acc):
            batch = batch_at(a.pre_features, a.pre_mask, start + j)
            sums = self.call("prepass.step", step, ctx.broadcast, batch, ctx._replace(step=j))
            return jax.tree.map(jnp.add, acc, sums)

        return self.loop(count, body, zeros, "prepass batch")

    def step(self, local, a: RoundArrays, i, ctx: Context):
        fn = self.alg.client_step
        if len(self.sizes) < 2:
            return self.call("client_step", fn, local, batch_at(a.features, a.mask, i), ctx)
        branches = [lambda l, n=n: self.call("client_step", fn, l, batch_at(a.features, a.mask, i, n), ctx)
                    for n in self.sizes]
        return jax.lax.switch(a.bucket[i], branches, local)

    def train(self, a: RoundArrays, slot: tuple, client_state, ctx: Context, train_key):
        """``(ClientOut, metric_sums)`` of the client in ``slot = (start, steps, pre_start, pre_steps,
        num_examples, position)``."""
        start, steps, pre_start, pre_steps, n, pos = slot
        init_key, step_key, final_key = client_keys(train_key, pos)
        ctx = ctx._replace(position=pos, num_examples=n, num_steps=steps)
        pre = None
        if self.alg.prepass is not None and self.alg.prepass.cohort is None:
            pre = self.prepass(a, pre_start, pre_steps, ctx._replace(rng=init_key))
        local = self.call("client_init", self.alg.client_init, ctx.broadcast, client_state, pre,
                          ctx._replace(rng=init_key))
        sums_shape = jax.eval_shape(lambda l: self.step(l, a, 0, ctx._replace(rng=step_key))[1], local)

        def body(j, carry):
            local, sums = carry
            local, step_sums = self.step(local, a, start + j, ctx._replace(rng=jax.random.fold_in(step_key, j), step=j))
            return local, jax.tree.map(jnp.add, sums, step_sums)

        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape)
        local, sums = self.loop(steps, body, (local, zeros), "local step")
        out = self.call("client_final", self.alg.client_final, ctx.broadcast, local, ctx._replace(rng=final_key))
        return out, sums


def _masked(real, tree):
    return jax.tree.map(lambda x: jnp.where(real, x, jnp.zeros_like(x)), tree)


def make_lane_fn(algorithm: Algorithm, buckets: tuple[int, ...], batch_size: int):
    """``lane(arrays, client_states, ctx, train_key, contrib_key, agg_state) -> (summed, SlotOutputs)``
    for one lane: a scan over its slots. ``summed = ((part, sides), stats, clients)``."""
    client = ClientRound(algorithm, buckets, batch_size)
    agg = algorithm.aggregator

    def lane(a: RoundArrays, client_states, ctx: Context, train_key, contrib_key, agg_state):
        def one(total, x):
            slot, cstate = x
            out, sums = client.train(a, slot, cstate, ctx, train_key)
            pos, real = slot[5], slot[1] > 0
            part, sides = agg.contribution(out.update, out.weight, jax.random.fold_in(contrib_key, pos), agg_state)
            new_state = (None if cstate is None else
                         jax.tree.map(lambda n, o: jnp.where(real, n.astype(o.dtype), o), out.client_state, cstate))
            gathered = _masked(real, part) if agg.gathers else ()
            summed = ((() if agg.gathers else _masked(real, part), _masked(real, sides)), _masked(real, out.stats),
                      real.astype(jnp.float32))
            total = summed if total is None else jax.tree.map(jnp.add, total, summed)
            return total, SlotOutputs(sums, global_norm(out.update), out.metrics, new_state, gathered)

        slots = (a.start, a.steps, a.pre_start, a.pre_steps, a.num_examples, a.positions)
        first = jax.tree.map(lambda x: x[0], (slots, client_states))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(lambda x: one(None, x)[0], first))
        return jax.lax.scan(one, zeros, (slots, client_states))

    return lane


def make_cohort_prepass_fn(algorithm: Algorithm, batch_size: int):
    """``lane(arrays, ctx, train_key) -> the prepass sums of the lane's clients``."""
    client = ClientRound(algorithm, (), batch_size)

    def lane(a: RoundArrays, ctx: Context, train_key):
        def one(total, slot):
            start, _, pre_start, pre_steps, n, pos = slot
            sums = client.prepass(a, pre_start, pre_steps,
                                  ctx._replace(position=pos, num_examples=n, rng=client_keys(train_key, pos)[0]))
            return (sums if total is None else jax.tree.map(jnp.add, total, sums)), None

        slots = (a.start, a.steps, a.pre_start, a.pre_steps, a.num_examples, a.positions)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                             jax.eval_shape(lambda x: one(None, x)[0], jax.tree.map(lambda x: x[0], slots)))
        return jax.lax.scan(one, zeros, slots)[0]

    return lane


def _index(tree: PyTree, i) -> PyTree:
    return jax.tree.map(lambda x: x[i], tree)


def map_lanes(mesh=None, group: int | None = None):
    """``run(f, lane_args, shared) -> (sum over lanes, per-lane outputs stacked)``.

    ``f(*one_lane_args, *shared) -> (summed, stacked)``. One lane runs as is, several are vmapped;
    more than ``group`` lanes run as a ``scan`` over groups of ``group`` vmapped lanes, so
    activation memory is bounded by the group, not the cohort. With a ``mesh`` the lane axis is
    split over its devices (``shard_map``), each device runs its lanes and the sums are
    all-reduced across devices (and hosts) inside the same program.
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
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                             jax.eval_shape(lambda a: vmapped(f, a, shared)[0], _index(grouped, 0)))

        def body(total, chunk):
            summed, stacked = vmapped(f, chunk, shared)
            return jax.tree.map(jnp.add, total, summed), stacked

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


def make_round_fn(algorithm: Algorithm, ctx: Context, *, buckets: tuple[int, ...], batch_size: int, mesh=None,
                  lane_group: int | None = None, on_trace=None):
    """``round_fn(server_state, agg_state, client_hparams, client_states, arrays, round_key_data, round_index)
    -> RoundOutputs``: the whole round (``round_key_data``: ``jax.random.key_data`` of the round's key).
    ``ctx`` holds the run's static facts."""
    calls = Calls(algorithm)
    lane = make_lane_fn(algorithm, buckets, batch_size)
    run_lanes = map_lanes(mesh, lane_group)
    cohort_prepass = algorithm.prepass is not None and algorithm.prepass.cohort is not None
    pre_lane = make_cohort_prepass_fn(algorithm, batch_size) if cohort_prepass else None

    def round_fn(server_state, agg_state, client_hparams, client_states, arrays: RoundArrays, round_key_data,
                 round_index):
        if on_trace is not None:
            on_trace()
        train_key, contrib_key, server_key = round_keys(jax.random.wrap_key_data(round_key_data))
        c = ctx._replace(round=round_index, client_hparams=client_hparams)
        bc = calls("broadcast", algorithm.broadcast, server_state, c)
        # Only arrays cross into the mapped lanes: the context's static part is closed over.
        dynamic = {"round": round_index, "client_hparams": client_hparams, "broadcast": bc}
        if cohort_prepass:
            total, _ = run_lanes(lambda a, d, k: (pre_lane(a, ctx._replace(**d), k), ()), (arrays,),
                                 (dynamic, train_key))
            bc = calls("prepass.cohort", algorithm.prepass.cohort, bc, total, c._replace(broadcast=bc, rng=server_key))
            dynamic["broadcast"] = bc
        summed, slots = run_lanes(lambda a, cs, d, *rest: lane(a, cs, ctx._replace(**d), *rest),
                                  (arrays, client_states), (dynamic, train_key, contrib_key, agg_state))
        return finish_round(algorithm, server_state, agg_state, summed, slots, c._replace(broadcast=bc, rng=server_key))

    return round_fn


def finish_round(algorithm: Algorithm, server_state, agg_state, summed, slots: SlotOutputs, ctx: Context):
    """Aggregates the summed contributions and applies the server update. For an aggregator that
    gathers, ``slots.gathered`` holds every slot's ``(update, weight)`` ([lanes, slots, ...],
    weight 0 in empty slots), handed to ``finalize`` as one client axis."""
    (part, sides), stats, clients = summed
    if algorithm.aggregator.gathers:
        part = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), slots.gathered)
    server_key = ctx.rng
    aggregate, new_agg_state, agg_metrics = algorithm.aggregator.finalize((part, sides), server_key, agg_state)
    agg_state = new_agg_state if algorithm.aggregator.stateful else agg_state
    new_state, server_metrics = Calls(algorithm)("server_update", algorithm.server_update, server_state, aggregate,
                                                 stats, ctx._replace(rng=jax.random.fold_in(server_key, 1),
                                                                     cohort_size=clients))
    metrics = {"update_norm": global_norm(aggregate), **agg_metrics, **server_metrics,
               STATE_FINITE: all_finite((new_state, agg_state))}
    return RoundOutputs(new_state, agg_state, slots._replace(gathered=()), metrics)


STATE_FINITE = "state_finite"  # a metric of the compiled round, moved into RoundResult.info by the engine


def all_finite(tree) -> jax.Array:
    """True when every floating-point value of ``tree`` is finite (one cheap reduction per leaf)."""
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
             if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)
