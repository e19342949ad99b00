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


def _rank_mean(updates, weights, lower, upper):
    """Per coordinate, the mean of the present clients' values whose rank (ascending, among the
    ``n`` present clients) lies in ``[lower, upper]``; absent clients and NaN sort last as ``+inf``.
    Zero when no client is present."""
    present = weights > 0
    count = _count(weights)
    kept = jnp.maximum(upper - lower + 1, 1)

    def leaf(x):
        mask = present.reshape(present.shape + (1,) * (x.ndim - 1))
        wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        values = jnp.sort(jnp.where(mask & ~jnp.isnan(wide), wide, jnp.inf), axis=0)
        ranks = jnp.arange(x.shape[0]).reshape((-1,) + (1,) * (x.ndim - 1))
        total = jnp.sum(jnp.where((ranks >= lower) & (ranks <= upper), values, 0.0), axis=0)
        return jnp.where(count > 0, total / kept.astype(values.dtype), 0.0).astype(x.dtype)

    return jax.tree.map(leaf, updates)


def _count(weights):
    return jnp.sum((weights > 0).astype(jnp.int32))


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
        count = _count(weights)
        # floor(beta * n) for every n the slots allow, computed exactly on the host
        cut = jnp.asarray([math.floor(value * n) for n in range(weights.shape[0] + 1)], jnp.int32)[count]
        return _rank_mean(updates, weights, cut, count - cut - 1), state, ctx, {"robust_trimmed": (2 * cut).astype(jnp.float32)}

    return Aggregator((Stage("trimmed_mean", _passthrough, server, reduces=True, gathers=True),), "trimmed_mean")


def median() -> Aggregator:
    """Coordinate-wise median of the present clients' updates (unweighted); for an even number of
    clients, the average of the two middle values."""

    def server(total, side, rng, state, ctx):
        del side, rng
        updates, weights = total
        count = _count(weights)
        return _rank_mean(updates, weights, (count - 1) // 2, count // 2), state, ctx, {}

    return Aggregator((Stage("median", _passthrough, server, reduces=True, gathers=True),), "median")
