"""Reducing stages: weighted and uniform means."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedtrain.aggregators.base import Aggregator, Stage


def _scale(update, factor):
    return jax.tree.map(lambda u: u * factor.astype(u.dtype), update)


def _divide(total, denom):
    denom = jnp.maximum(denom, jnp.finfo(jnp.float32).tiny)
    return jax.tree.map(lambda s: s / denom.astype(s.dtype), total)


def weighted_mean() -> Aggregator:
    """``sum_i w_i u_i / sum_i w_i`` with ``w_i`` the client weight (its number of examples)."""

    def client(update, weight, rng, state):
        del rng, state
        return _scale(update, weight), weight, weight

    def server(total, weight_sum, rng, state, ctx):
        del rng
        return _divide(total, weight_sum), state, ctx, {}

    return Aggregator((Stage("weighted_mean", client, server, reduces=True),), "weighted_mean")


def mean(denominator: float | None = None) -> Aggregator:
    """Uniform mean over participating clients (weight > 0).

    With ``denominator`` the sum is divided by that fixed number (e.g. the expected clients per
    round) instead of the count of participants, as differential privacy requires.
    """
    if denominator is not None and not float(denominator) > 0:
        raise ValueError(f"mean(denominator=...) must be > 0, got {denominator}.")

    def client(update, weight, rng, state):
        del rng, state
        present = (weight > 0).astype(jnp.float32)
        return _scale(update, present), present, present

    def server(total, count, rng, state, ctx):
        del rng
        denom = count if denominator is None else jnp.float32(denominator)
        return _divide(total, denom), state, ctx, {}

    return Aggregator((Stage("mean", client, server, reduces=True),), "mean")
