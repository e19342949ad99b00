"""Differential-privacy stages: fixed and adaptive clipping and Gaussian noise on the sum.

DP-FedAvg (McMahan et al., 2018) is ``chain(clip(C), gaussian_noise(z), mean(m))``: every client
update is clipped to L2 norm ``C``, ``N(0, (z C)^2)`` noise is added to the sum, and the sum is
divided by the fixed expected cohort size ``m``. ``adaptive_clip`` moves ``C`` toward a quantile of
the update norms (Andrew et al., 2021) from a noisy count of unclipped clients.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fedtrain.aggregators.base import Stage, global_norm


def _check_positive(name: str, value: float, allow_zero: bool = False) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}.")
    return value


def clip_by_norm(update, clip_norm):
    """Scales ``update`` so its global L2 norm is at most ``clip_norm``."""
    norm = global_norm(update)
    factor = jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-12))
    return jax.tree.map(lambda u: u * factor.astype(u.dtype), update), norm


def clip(clip_norm: float) -> Stage:
    """Clips each client update to global L2 norm ``clip_norm``; reports the fraction clipped."""
    clip_norm = _check_positive("clip_norm", clip_norm)

    def client(update, weight, rng, state):
        del rng
        update, norm = clip_by_norm(update, clip_norm)
        present = (weight > 0).astype(jnp.float32)
        return update, weight, (present * (norm > clip_norm), present)

    def server(total, side, rng, state, ctx):
        clipped, count = side
        ctx = dict(ctx, sensitivity=jnp.float32(clip_norm))
        return total, state, ctx, {"clip_norm": jnp.float32(clip_norm),
                                   "clipped_fraction": clipped / jnp.maximum(count, 1.0)}

    return Stage("clip", client, server)


def adaptive_clip(initial_clip_norm: float, target_quantile: float = 0.5, learning_rate: float = 0.2,
                  count_stddev: float = 0.0, expected_clients: float | None = None) -> Stage:
    """Clip norm that tracks the ``target_quantile`` of update norms (Andrew et al., 2021).

    Each round ``C <- C * exp(-learning_rate * (b - target_quantile))`` where
    ``b = (sum_i (1[|u_i| <= C] - 1/2) + N(0, count_stddev^2)) / m + 1/2`` estimates the fraction of
    unclipped clients, ``m`` being ``expected_clients`` (the participant count when ``None``).
    """
    initial_clip_norm = _check_positive("initial_clip_norm", initial_clip_norm)
    _check_positive("learning_rate", learning_rate, allow_zero=True)
    _check_positive("count_stddev", count_stddev, allow_zero=True)
    if not 0.0 <= float(target_quantile) <= 1.0:
        raise ValueError(f"target_quantile must be in [0, 1], got {target_quantile}.")
    if expected_clients is not None:
        _check_positive("expected_clients", expected_clients)

    def init(params):
        del params
        return jnp.float32(initial_clip_norm)

    def client(update, weight, rng, clip_norm):
        del rng
        update, norm = clip_by_norm(update, clip_norm)
        present = (weight > 0).astype(jnp.float32)
        # Centred indicator b - 1/2: sensitivity 1/2, as in the paper.
        return update, weight, (present * ((norm <= clip_norm) - 0.5), present)

    def server(total, side, rng, clip_norm, ctx):
        centred, count = side
        noisy = centred + count_stddev * jax.random.normal(rng, (), jnp.float32)
        denom = jnp.maximum(count, 1.0) if expected_clients is None else jnp.float32(expected_clients)
        fraction = noisy / denom + 0.5
        unclipped = centred + 0.5 * count
        new_clip = clip_norm * jnp.exp(-learning_rate * (fraction - target_quantile))
        ctx = dict(ctx, sensitivity=clip_norm)
        metrics = {"clip_norm": clip_norm, "clipped_fraction": 1.0 - unclipped / jnp.maximum(count, 1.0)}
        return total, new_clip, ctx, metrics

    return Stage("adaptive_clip", client, server, init)


def gaussian_noise(noise_multiplier: float) -> Stage:
    """Adds ``N(0, (noise_multiplier * C)^2)`` to every coordinate of the summed, clipped updates."""
    noise_multiplier = _check_positive("noise_multiplier", noise_multiplier, allow_zero=True)

    def client(update, weight, rng, state):
        del rng, state
        return update, weight, ()

    def server(total, side, rng, state, ctx):
        del side
        std = noise_multiplier * ctx["sensitivity"]
        leaves, treedef = jax.tree.flatten(total)
        keys = jax.random.split(rng, max(len(leaves), 1))
        noisy = [x + (std * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
                 for x, k in zip(leaves, keys)]
        return jax.tree.unflatten(treedef, noisy), state, ctx, {"noise_stddev": jnp.float32(std)}

    return Stage("gaussian_noise", client, server)


def adaptive_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """Multiplier for the update noise so that, with the clip count noised by ``count_stddev``, the
    whole mechanism has ``noise_multiplier`` (Andrew et al., 2021, Thm. 1): ``(z^-2 - (2 s)^-2)^-1/2``."""
    z, s = float(noise_multiplier), float(count_stddev)
    if s == 0:
        return z
    rest = z ** -2 - (2 * s) ** -2
    if rest <= 0:
        raise ValueError(f"count_stddev={s} is too small for noise_multiplier={z}: "
                         f"it needs count_stddev > noise_multiplier / 2 = {z / 2}.")
    return rest ** -0.5
