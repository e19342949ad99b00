"""Byzantine-robust reducing stages: coordinate-wise trimmed mean and median (Yin et al., 2018,
"Byzantine-robust distributed learning: towards optimal statistical rates").

Both are *unweighted*, as in the paper: every participating client (weight > 0) counts once,
whatever its number of examples; the weight only says whether the client is present. They
gather the cohort's updates (see :class:`~fedtrain.aggregators.Stage`), so a round keeps one
update per cohort slot in memory, and sort them per coordinate along the client axis: absent
clients and empty slots are sorted to the end as ``+inf`` and ranks are compared with the
dynamic count ``n`` of present clients, so the same compiled round serves any cohort. A NaN
coordinate ranks as ``+inf`` (the largest value). With no present client the aggregate is zero.
They suit algorithms whose update is a model delta (the FedAvg / FedOpt family, FedProx).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fedtrain.aggregators.base import Aggregator, Stage


def _sort_clients(x, present):
    """``x`` [slots, ...] sorted along the client axis with absent clients (and NaN) as ``+inf``, and the
    rank of every row, shaped to broadcast against it."""
    mask = present.reshape(present.shape + (1,) * (x.ndim - 1))
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    values = jnp.sort(jnp.where(mask & ~jnp.isnan(x), x, jnp.inf), axis=0)
    ranks = jnp.arange(x.shape[0]).reshape((-1,) + (1,) * (x.ndim - 1))
    return values, ranks


def _passthrough(update, weight, rng, state):
    del rng, state
    return update, weight, ()


def trimmed_mean(beta: float) -> Aggregator:
    """Coordinate-wise trimmed mean: for every coordinate, drops the ``floor(beta * n)`` smallest and
    ``floor(beta * n)`` largest values among the ``n`` present clients and averages the others
    (unweighted). ``0 <= beta < 0.5``; ``beta = 0`` is the uniform mean. Logs ``robust_trimmed``, the
    number of values dropped per coordinate (``2 floor(beta n)``)."""
    value = float(beta)
    if not (math.isfinite(value) and 0.0 <= value < 0.5):
        raise ValueError(f"trimmed_mean(beta) needs 0 <= beta < 0.5 (the fraction trimmed from each end), got {beta}.")

    def server(total, side, rng, state, ctx):
        del side, rng
        updates, weights = total
        present = weights > 0
        count = jnp.sum(present.astype(jnp.int32))
        # floor(beta * n) for every n the slots allow, computed exactly on the host
        cut = jnp.asarray([math.floor(value * n) for n in range(weights.shape[0] + 1)], jnp.int32)[count]
        kept = jnp.maximum(count - 2 * cut, 1)  # >= 1 whenever a client is present, as beta < 0.5

        def leaf(x):
            values, ranks = _sort_clients(x, present)
            keep = (ranks >= cut) & (ranks < count - cut)
            kept_sum = jnp.sum(jnp.where(keep, values, 0.0), axis=0)
            return (kept_sum / kept.astype(values.dtype)).astype(x.dtype)

        return jax.tree.map(leaf, updates), state, ctx, {"robust_trimmed": (2 * cut).astype(jnp.float32)}

    return Aggregator((Stage("trimmed_mean", _passthrough, server, reduces=True, gathers=True),), "trimmed_mean")


def median() -> Aggregator:
    """Coordinate-wise median of the present clients' updates (unweighted); for an even number of
    clients, the average of the two middle values."""

    def server(total, side, rng, state, ctx):
        del side, rng
        updates, weights = total
        present = weights > 0
        count = jnp.sum(present.astype(jnp.int32))
        lower, upper = (count - 1) // 2, count // 2

        def leaf(x):
            values, ranks = _sort_clients(x, present)
            middle = jnp.where(ranks == lower, values, 0.0) + jnp.where(ranks == upper, values, 0.0)
            return jnp.where(count > 0, jnp.sum(middle, axis=0) / 2, 0.0).astype(x.dtype)

        return jax.tree.map(leaf, updates), state, ctx, {}

    return Aggregator((Stage("median", _passthrough, server, reduces=True, gathers=True),), "median")
