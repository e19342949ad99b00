"""Compression stages (Suresh et al., 2017, as in FedJAX): each client's update is stochastically
quantized before it is summed; ``bits_per_client`` is reported in the round's logs.

Bits per client follow FedJAX: ``log2(levels)`` bits per coordinate plus two 32-bit floats
(min and max) per leaf; rotated quantization counts the padded coordinates it sends.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fedtrain.aggregators.base import Stage


def uniform_stochastic_quantize(v: jax.Array, num_levels: int, rng: jax.Array) -> jax.Array:
    """Unbiased rounding of ``v`` to ``num_levels`` evenly spaced values between its min and max."""
    v_min, v_max = jnp.min(v), jnp.max(v)
    span = v_max - v_min
    scaled = jnp.where(span > 0, (v - v_min) / jnp.where(span > 0, span, 1.0), 0.0) * (num_levels - 1)
    floor = jnp.floor(scaled)
    up = jax.random.uniform(rng, v.shape) < (scaled - floor)
    return v_min + (floor + up) / (num_levels - 1) * span


def fwht(x: jax.Array) -> jax.Array:
    """Unnormalised Walsh-Hadamard transform of a vector whose length is a power of two."""
    d = x.shape[0]
    h = 1
    while h < d:
        x = x.reshape(d // (2 * h), 2, h)
        x = jnp.stack([x[:, 0] + x[:, 1], x[:, 0] - x[:, 1]], axis=1).reshape(d)
        h *= 2
    return x


def _padded(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _rotated_quantize(v: jax.Array, num_levels: int, rng: jax.Array) -> jax.Array:
    """Randomized Hadamard rotation ``H D v / sqrt(d)``, quantization, then the inverse rotation."""
    shape, n = v.shape, v.size
    d = _padded(n)
    sign_key, q_key = jax.random.split(rng)
    signs = jax.random.rademacher(sign_key, (d,), jnp.float32)
    x = jnp.zeros((d,), jnp.float32).at[:n].set(v.reshape(-1).astype(jnp.float32))
    rotated = fwht(signs * x) / math.sqrt(d)
    q = uniform_stochastic_quantize(rotated, num_levels, q_key)
    back = signs * fwht(q) / math.sqrt(d)
    return back[:n].reshape(shape).astype(v.dtype)


def _quantizer(name: str, num_levels: int, rotate: bool) -> Stage:
    num_levels = int(num_levels)
    if num_levels < 2:
        raise ValueError(f"num_levels must be >= 2, got {num_levels}.")
    one = _rotated_quantize if rotate else uniform_stochastic_quantize

    def client(update, weight, rng, state):
        del state
        leaves, treedef = jax.tree.flatten(update)
        keys = jax.random.split(rng, max(len(leaves), 1))
        leaves = [one(x, num_levels, k) for x, k in zip(leaves, keys)]
        return jax.tree.unflatten(treedef, leaves), weight, ()

    def server(total, side, rng, state, ctx):
        del side, rng
        leaves = jax.tree.leaves(total)
        coords = sum(_padded(x.size) if rotate else x.size for x in leaves)
        bits = math.log2(num_levels) * coords + 64 * len(leaves)
        return total, state, ctx, {"bits_per_client": jnp.float32(bits)}

    return Stage(name, client, server)


def uniform_quantization(num_levels: int) -> Stage:
    """Uniform stochastic quantization of every leaf to ``num_levels`` levels."""
    return _quantizer("uniform_quantization", num_levels, rotate=False)


def binary_quantization() -> Stage:
    """Binary stochastic quantization: every coordinate becomes its leaf's min or max (unbiased)."""
    return _quantizer("binary_quantization", 2, rotate=False)


def rotated_quantization(num_levels: int) -> Stage:
    """Uniform stochastic quantization after a randomized Walsh-Hadamard rotation of every leaf."""
    return _quantizer("rotated_quantization", num_levels, rotate=True)
