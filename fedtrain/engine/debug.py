"""The ``debug`` backend: the same round as plain Python, one client and one step at a time,
without jit. Slow; for finding which client breaks and for checking the compiled engine."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedtrain.aggregators import global_norm
from fedtrain.algorithms.base import Algorithm, aggregator_state
from fedtrain.engine.plan import RoundPlan
from fedtrain.engine.round import RoundOutput, client_keys, finish_round
from fedtrain.models.adapter import MASK_KEY, Model


class ClientStepError(RuntimeError):
    """A client's local step failed; the message names the round, client and step."""


def run_round_debug(model: Model, algorithm: Algorithm, server_state, plan: RoundPlan, client_states,
                    round_key) -> RoundOutput:
    b = plan.batch
    lanes, slots = b.weights.shape
    broadcast = algorithm.broadcast(server_state)
    agg_state = aggregator_state(algorithm, server_state)
    train_key, contrib_key, server_key = client_keys(round_key)
    pre = algorithm.prepass

    def batch_of(lane, i):
        batch = {k: jnp.asarray(v[lane, i]) for k, v in b.features.items()}
        batch[MASK_KEY] = jnp.asarray(b.mask[lane, i])
        return batch

    def client_steps(lane, s):
        return [i for i in range(int(b.num_steps[lane])) if b.slot[lane, i] == s]

    def prepass_of(lane, steps):
        acc = pre.init(model, broadcast)
        for i in steps:
            acc = pre.step(model, broadcast, acc, batch_of(lane, i))
        return acc

    if pre is not None and pre.cohort is not None:
        total = None
        for lane, s in plan.placement:
            steps = client_steps(lane, s)
            if steps:
                acc = prepass_of(lane, steps)
                total = acc if total is None else jax.tree.map(jnp.add, total, acc)
        if total is not None:
            broadcast = pre.cohort(broadcast, total)
    contrib_total = None
    gathers, gathered = algorithm.aggregator.gathers, None
    metric_sums: dict = {}
    update_norm = np.zeros((lanes, slots), np.float32)
    extras: dict = {}
    new_states = client_states
    for pos, (lane, s) in enumerate(plan.placement):
        cid = plan.client_ids[pos]
        steps = client_steps(lane, s)
        if not steps:
            continue
        state = None if client_states is None else jax.tree.map(lambda x: x[lane, s], client_states)
        init_args = (model, broadcast, state, jax.random.fold_in(train_key, pos))
        if pre is not None and pre.cohort is None:
            init_args = init_args + (prepass_of(lane, steps),)
        local = algorithm.client_init(*init_args)
        sums = None
        for j, i in enumerate(steps):
            batch = batch_of(lane, i)
            where = f"round {plan.round_index + 1}, client {cid!r} (cohort position {pos}), local step {j + 1}/{len(steps)}"
            try:
                local, step_sums = algorithm.client_step(model, local, batch)
            except Exception as e:  # re-raised with the client named
                raise ClientStepError(f"{where}: {type(e).__name__}: {e}") from e
            loss_sum = float(step_sums["loss"][0])
            if not np.isfinite(loss_sum):
                raise ClientStepError(f"{where}: the loss is {loss_sum}; check this client's data and the learning rate.")
            sums = step_sums if sums is None else jax.tree.map(jnp.add, sums, step_sums)
        out = algorithm.client_final(model, broadcast, local, jnp.float32(b.weights[lane, s]))
        c = (algorithm.aggregator.contribution(out.update, out.weight, jax.random.fold_in(contrib_key, pos),
                                               agg_state), out.stats)
        if gathers:  # the client's (update, weight) in its [lane, slot]; the sides are summed
            (part, sides), stats = c
            if gathered is None:
                gathered = jax.tree.map(lambda v: jnp.zeros((lanes, slots) + v.shape, v.dtype), part)
            gathered = jax.tree.map(lambda buf, v: buf.at[lane, s].set(v), gathered, part)
            c = (((), sides), stats)
        contrib_total = c if contrib_total is None else jax.tree.map(jnp.add, contrib_total, c)
        update_norm[lane, s] = float(global_norm(out.update))
        for name, (total, count) in sums.items():
            metric_sums.setdefault(name, (np.zeros((lanes, slots), np.float32), np.zeros((lanes, slots), np.float32)))
            metric_sums[name][0][lane, s] = float(total)
            metric_sums[name][1][lane, s] = float(count)
        for name, value in out.metrics.items():
            extras.setdefault(name, np.zeros((lanes, slots) + np.shape(value), np.float32))
            extras[name][lane, s] = np.asarray(value)
        if new_states is not None:
            new_states = jax.tree.map(lambda buf, v: buf.at[lane, s].set(v), new_states, out.client_state)
    if contrib_total is None:
        raise ValueError(f"round {plan.round_index + 1}: no client in the cohort has any examples.")
    per_slot = {
        "metric_sums": {k: (jnp.asarray(t), jnp.asarray(c)) for k, (t, c) in metric_sums.items()},
        "update_norm": jnp.asarray(update_norm),
        "extras": {k: jnp.asarray(v) for k, v in extras.items()},
        "client_states": new_states,
    }
    if gathers:
        per_slot["gathered"] = gathered
    return finish_round(algorithm, server_state, contrib_total, per_slot, server_key)
