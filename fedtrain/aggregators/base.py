"""The aggregator contract and ``chain``.

An aggregator is a chain of stages (optax style). Each client's update goes
through every stage's ``client`` function in order, and the result is *summed*
over clients (inside a lane, across lanes and across devices); the sum then
goes through every stage's ``server`` function in order. Keeping the
cross-client step a plain sum is what lets the engine stream clients through
a scan, vmap them, or shard them, with the same result.

Exactly one stage *reduces* (a mean): it is the last stage, and stages before
it see one client's raw update. Stages may keep state across rounds (e.g. an
adaptive clip norm); it lives in the algorithm's server state.

A reducing stage that cannot work from a sum (a robust mean such as a median)
*gathers*: the engine keeps every client's update, stacked over the cohort's
slots, and hands the stack to that stage's ``server``; the sides of all stages
are still summed. This costs one update per cohort slot in memory, so the sum
path stays the default.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any


def global_norm(tree: PyTree) -> jax.Array:
    """L2 norm of all leaves of ``tree`` together."""
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves)) if leaves else jnp.float32(0)


def _no_state(params: PyTree) -> tuple:
    del params
    return ()


class Stage(NamedTuple):
    """One step of an aggregator.

    - ``client(update, weight, rng, state) -> (update, weight, side)``: per client; ``side`` is summed
      over clients and handed to ``server``.
    - ``server(total, side_total, rng, state, ctx) -> (total, state, ctx, metrics)``: once per round on
      the summed updates; ``ctx`` passes facts to later stages (e.g. ``ctx['sensitivity']``).
    - ``init(params) -> state``.

    A reducing stage with ``gathers=True`` gets, instead of the summed updates, ``total = (updates, weights)``:
    its ``client`` outputs stacked over the cohort's slots (leading axis ``n``), with weight 0 for empty slots
    and absent clients; its ``side`` is still summed. Stages before it run their ``server`` on a zero tree
    shaped like one update and must return that tree unchanged (they may read shapes, sides and ``ctx``).
    """

    name: str
    client: Callable
    server: Callable
    init: Callable = _no_state
    reduces: bool = False
    gathers: bool = False


class Aggregator(NamedTuple):
    """A validated chain of :class:`Stage`; the engine calls ``init``, ``contribution`` and ``finalize``."""

    stages: tuple[Stage, ...]
    name: str = "aggregator"

    @property
    def stateful(self) -> bool:
        return any(s.init is not _no_state for s in self.stages)

    @property
    def gathers(self) -> bool:
        """Whether the reducing stage needs every client's contribution rather than their sum."""
        return any(s.reduces and s.gathers for s in self.stages)

    def init(self, params: PyTree) -> tuple:
        """The aggregator state: one entry per stage."""
        return tuple(s.init(params) for s in self.stages)

    def contribution(self, update: PyTree, weight: jax.Array, rng: jax.Array, state: tuple | None = None) -> PyTree:
        """One client's contribution ``(part, sides)``: ``part`` is the update to sum, or, when the
        aggregator :attr:`gathers`, ``(update, weight)`` to stack over clients; ``sides`` are always summed."""
        state = self._state(state)
        weight = jnp.asarray(weight, jnp.float32)
        sides = []
        for i, (stage, st) in enumerate(zip(self.stages, state)):
            update, weight, side = stage.client(update, weight, jax.random.fold_in(rng, i), st)
            sides.append(side)
        return ((update, weight) if self.gathers else update), tuple(sides)

    def finalize(self, total: PyTree, rng: jax.Array, state: tuple | None = None):
        """``(aggregate, new_state, metrics)`` from ``(part, sides)``: the sum of the contributions, except
        that when the aggregator :attr:`gathers` ``part`` is ``(updates, weights)`` stacked over clients."""
        state = self._state(state)
        total, sides = total
        template = None
        if self.gathers:  # stages before the mean see one update's shapes, not a sum
            template = jax.tree.map(lambda x: jnp.zeros(x.shape[1:], x.dtype), total[0])
        ctx: dict[str, Any] = {}
        metrics: dict[str, jax.Array] = {}
        new_state = []
        for i, (stage, st, side) in enumerate(zip(self.stages, state, sides)):
            key = jax.random.fold_in(rng, i)
            if template is not None and not stage.reduces:
                out, st, ctx, m = stage.server(template, side, key, st, ctx)
                if out is not template:
                    raise ValueError(f"stage {stage.name!r} changes the summed update in its server step, which "
                                     f"a gathering mean ({self.stages[-1].name}) has no sum for.")
            else:
                total, st, ctx, m = stage.server(total, side, key, st, ctx)
            new_state.append(st)
            metrics.update(m)
        return total, tuple(new_state), metrics

    def _state(self, state):
        if state is None or state == ():
            if self.stateful:
                raise ValueError(f"aggregator {self.name!r} keeps state; pass the state from init().")
            return tuple(() for _ in self.stages)
        return state


def chain(*parts: Aggregator | Stage, name: str | None = None) -> Aggregator:
    """Composes stages and aggregators left to right, e.g. ``chain(clip(1.0), gaussian_noise(0.8), mean(100))``.

    The last stage must be a mean (the only reducing stage); ``gaussian_noise`` needs a clipping stage
    before it and a uniform mean after it (not a gathering one such as ``median()``).
    """
    stages: list[Stage] = []
    for p in parts:
        if isinstance(p, Aggregator):
            stages.extend(p.stages)
        elif isinstance(p, Stage):
            stages.append(p)
        else:
            raise TypeError(f"chain() takes aggregators and stages; got {type(p).__name__}.")
    if not stages or not stages[-1].reduces:
        raise ValueError("an aggregator must end with a mean stage, e.g. chain(..., fedtrain.aggregators.mean()).")
    if sum(s.reduces for s in stages) != 1:
        raise ValueError(f"an aggregator has exactly one mean stage; got {[s.name for s in stages]}.")
    if any(s.gathers and not s.reduces for s in stages):
        raise ValueError(f"only the mean stage can gather client updates; got {[s.name for s in stages]}.")
    names = [s.name for s in stages]
    if stages[-1].gathers and "gaussian_noise" in names:
        raise ValueError(f"gaussian_noise cannot come before {names[-1]}: the noise is calibrated for a sum of "
                         f"clipped updates, and {names[-1]} gathers every client's update instead of summing them.")
    if "gaussian_noise" in names:
        i = names.index("gaussian_noise")
        if not any(n in ("clip", "adaptive_clip") for n in names[:i]):
            raise ValueError("gaussian_noise needs a clip(...) or adaptive_clip(...) stage before it: "
                             "the noise is scaled to the clip norm.")
        if names[-1] == "weighted_mean":
            raise ValueError("gaussian_noise with weighted_mean() is not private (weights are unbounded); "
                             "use mean(denominator=expected_clients_per_round).")
    return Aggregator(tuple(stages), name or "+".join(names))


def transform(name: str, fn: Callable[[PyTree, jax.Array], PyTree]) -> Stage:
    """A stateless per-client stage applying ``fn(update, rng)``."""

    def client(update, weight, rng, state):
        del state
        return fn(update, rng), weight, ()

    def server(total, side, rng, state, ctx):
        return total, state, ctx, {}

    return Stage(name, client, server)
