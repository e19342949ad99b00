"""Small pieces shared by several algorithms."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fedtrain.models.adapter import MASK_KEY, Model

PyTree = Any


def tree_sub(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(jnp.subtract, a, b)


def tree_add(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(jnp.add, a, b)


def tree_scale(a: PyTree, s) -> PyTree:
    return jax.tree.map(lambda x: x * jnp.asarray(s, x.dtype), a)


def tree_zeros(a: PyTree) -> PyTree:
    return jax.tree.map(jnp.zeros_like, a)


def safe_div(a, b):
    return a / jnp.where(b > 0, b, 1.0)


def example_losses(model: Model, params: PyTree, batch: dict, rng=None, train: bool = False):
    """Per-example loss sums and counts ``([B], [B])`` with padding excluded, plus the logits."""
    logits = model.apply(params, batch[model.input_key], rng, train)
    values, weights = model.loss.fn(batch, logits)
    mask = batch[MASK_KEY].reshape(batch[MASK_KEY].shape + (1,) * (weights.ndim - 1))
    weights = weights * mask
    axes = tuple(range(1, weights.ndim))
    return jnp.sum(values * weights, axis=axes), jnp.sum(weights, axis=axes), logits


def grad_sum(model: Model, params: PyTree, batch: dict):
    """Gradient of the *summed* loss over the batch's real examples, and their count."""

    def total(p):
        losses, counts, _ = example_losses(model, p, batch, None, True)
        return jnp.sum(losses), jnp.sum(counts)

    grads, count = jax.grad(total, has_aux=True)(params)
    return grads, count
