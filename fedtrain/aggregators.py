"""Aggregators: how client updates become one server update.

An aggregator is two pure functions. ``contribution(update, weight, rng)``
maps one client's update to a pytree that is *summed* over clients (inside a
lane, across lanes and across devices); ``finalize(total, rng)`` turns the sum
into the aggregate. Keeping the cross-client step a plain sum is what lets the
engine stream clients through a scan, vmap them, or shard them over devices
with the same result.
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


class Aggregator(NamedTuple):
    """``contribution(update, weight, rng) -> summable``; ``finalize(total, rng) -> (aggregate, metrics)``."""

    contribution: Callable[[PyTree, jax.Array, jax.Array], PyTree]
    finalize: Callable[[PyTree, jax.Array], tuple[PyTree, dict[str, jax.Array]]]
    name: str = "aggregator"


def weighted_mean() -> Aggregator:
    """``sum_i w_i u_i / sum_i w_i`` with ``w_i`` the client weight (its number of examples)."""

    def contribution(update, weight, rng):
        del rng
        weight = jnp.asarray(weight, jnp.float32)
        return jax.tree.map(lambda u: u * weight.astype(u.dtype), update), weight

    def finalize(total, rng):
        del rng
        weighted_sum, weight_sum = total
        denom = jnp.maximum(weight_sum, jnp.finfo(jnp.float32).tiny)
        return jax.tree.map(lambda s: s / denom.astype(s.dtype), weighted_sum), {}

    return Aggregator(contribution, finalize, "weighted_mean")


def mean() -> Aggregator:
    """Uniform mean over participating clients (clients with weight 0 are left out)."""

    def contribution(update, weight, rng):
        del rng
        present = (jnp.asarray(weight) > 0).astype(jnp.float32)
        return jax.tree.map(lambda u: u * present.astype(u.dtype), update), present

    return Aggregator(contribution, weighted_mean().finalize, "mean")
