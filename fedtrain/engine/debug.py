"""The ``debug`` backend: the compiled round's per-client function run eagerly, one client and one
step at a time, without jit. Slow; for finding which client breaks and for checking the engine."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedtrain.aggregators import global_norm
from fedtrain.algorithms.base import Algorithm, Context
from fedtrain.engine.plan import RoundInput
from fedtrain.engine.round import (ClientRound, RoundOutputs, SlotOutputs, finish_round, make_cohort_prepass_fn,
                                   round_keys)


class ClientStepError(RuntimeError):
    """A client's local step failed; the message names the round, client and step."""


def _stack(rows: list, lanes: int, slots: int):
    """``rows[lane * slots + slot]`` pytrees stacked to ``[lanes, slots, ...]``."""
    return jax.tree.map(lambda *xs: jnp.stack(xs).reshape((lanes, slots) + jnp.shape(xs[0])), *rows)


def run_round_debug(algorithm: Algorithm, ctx: Context, server_state, agg_state, client_hparams, client_states,
                    round_input: RoundInput, round_key) -> RoundOutputs:
    a = jax.tree.map(jnp.asarray, round_input.arrays)
    lanes, slots = round_input.layout.lanes, round_input.layout.slots
    train_key, contrib_key, server_key = round_keys(round_key)
    c = ctx._replace(round=jnp.int32(round_input.round_index), client_hparams=client_hparams)
    c = c._replace(broadcast=algorithm.broadcast(server_state, c))
    if algorithm.prepass is not None and algorithm.prepass.cohort is not None:
        pre_lane = make_cohort_prepass_fn(algorithm, round_input.arrays.mask.shape[-1])
        total = jax.tree.map(lambda *xs: sum(xs), *[pre_lane(jax.tree.map(lambda x: x[lane], a), c, train_key)
                                                   for lane in range(lanes)])
        c = c._replace(broadcast=algorithm.prepass.cohort(c.broadcast, total, c._replace(rng=server_key)))
    agg = algorithm.aggregator
    total, rows = None, []
    for lane in range(lanes):
        lane_arrays = jax.tree.map(lambda x: x[lane], a)
        for s in range(slots):
            pos = int(round_input.arrays.positions[lane, s])
            slot = tuple(x[lane, s] for x in (a.start, a.steps, a.pre_start, a.pre_steps, a.num_examples, a.positions))
            cstate = None if client_states is None else jax.tree.map(lambda x: jnp.asarray(x[lane, s]), client_states)
            if pos < 0 or int(slot[1]) == 0:  # an empty slot: nothing to train, nothing to add
                rows.append(None)
                continue
            where = f"round {round_input.round_index + 1}, client {round_input.client_ids[pos]!r} (cohort position {pos})"
            client = ClientRound(algorithm, (), round_input.arrays.mask.shape[-1], loop=_checked_loop(where))
            out, sums = client.train(lane_arrays, slot, cstate, c, train_key)
            part, sides = agg.contribution(out.update, out.weight, jax.random.fold_in(contrib_key, pos), agg_state)
            summed = ((() if agg.gathers else part, sides), out.stats, jnp.float32(1))
            total = summed if total is None else jax.tree.map(jnp.add, total, summed)
            rows.append(SlotOutputs(sums, global_norm(out.update), out.metrics, out.client_state,
                                    part if agg.gathers else ()))
    real = [r for r in rows if r is not None]
    if not real:
        raise ValueError(f"round {round_input.round_index + 1}: no client in the cohort has any examples.")
    template = jax.tree.map(jnp.zeros_like, real[0])
    filled = []
    for i, r in enumerate(rows):
        if r is None:
            r = template
            if client_states is not None:
                r = r._replace(client_state=jax.tree.map(lambda x: jnp.asarray(x[i // slots, i % slots]), client_states))
        filled.append(r)
    return finish_round(algorithm, server_state, agg_state, total, _stack(filled, lanes, slots),
                        c._replace(rng=server_key))


def _checked_loop(where: str):
    def loop(n, body, init, what: str = "step"):
        carry = init
        n = int(n)
        for j in range(n):
            try:
                carry = body(j, carry)
            except ClientStepError:
                raise
            except Exception as e:  # re-raised with the client named
                raise ClientStepError(f"{where}, {what} {j + 1}/{n}: {type(e).__name__}: {e}") from e
            if what == "local step":
                loss_sum = float(carry[1]["loss"][0])
                if not np.isfinite(loss_sum):
                    raise ClientStepError(f"{where}, {what} {j + 1}/{n}: the loss is {loss_sum}; check this "
                                          "client's data and the learning rate.")
        return carry

    return loop
