"""Losses and metrics as pure functions of (batch, predictions).

Every metric returns ``(values, weights)``, two arrays of the same shape. The
engine reduces them as ``sum(values * weights * example_mask) / sum(weights *
example_mask)``, so a metric is an average over whatever its weights count:
examples for classification, non-PAD tokens for sequences. Sums and counts are
kept separately so that clients, batches and devices merge exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

Batch = Mapping[str, jax.Array]
MetricFn = Callable[[Batch, jax.Array], tuple[jax.Array, jax.Array]]


class Metric(NamedTuple):
    """A named metric: ``fn(batch, logits) -> (values, weights)``.

    ``class_labels`` names the batch feature holding integer class ids that index the logits'
    last axis (``None`` when the metric has none); the trainer checks their range before training.
    """

    name: str
    fn: MetricFn
    class_labels: str | None = None


def _ones_like_labels(labels: jax.Array) -> jax.Array:
    return jnp.ones(labels.shape, jnp.float32)


def sparse_categorical_crossentropy(label_key: str = "y") -> Metric:
    """Softmax cross-entropy with integer labels, averaged over examples."""

    def fn(batch, logits):
        labels = batch[label_key]
        values = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
        return values, _ones_like_labels(labels)

    return Metric("loss", fn, label_key)


def accuracy(label_key: str = "y", name: str = "accuracy") -> Metric:
    """Top-1 accuracy with integer labels."""

    def fn(batch, logits):
        labels = batch[label_key]
        return (jnp.argmax(logits, -1) == labels).astype(jnp.float32), _ones_like_labels(labels)

    return Metric(name, fn, label_key)


def _token_weights(labels: jax.Array, pad_id: int | None, exclude_ids: tuple[int, ...]) -> jax.Array:
    keep = jnp.ones(labels.shape, bool)
    if pad_id is not None:
        keep &= labels != pad_id
    for token in exclude_ids:
        keep &= labels != token
    return keep.astype(jnp.float32)


def sequence_crossentropy(pad_id: int = 0, label_key: str = "y") -> Metric:
    """Per-token cross-entropy over ``[B, T]`` labels, ignoring PAD targets."""

    def fn(batch, logits):
        labels = batch[label_key]
        values = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
        return values, _token_weights(labels, pad_id, ())

    return Metric("loss", fn, label_key)


def sequence_accuracy(
    pad_id: int = 0,
    *,
    eos_id: int | None = None,
    masked_logits: tuple[int, ...] = (),
    label_key: str = "y",
    name: str | None = None,
) -> Metric:
    """Per-token accuracy ignoring PAD targets (and EOS targets if ``eos_id`` is given).

    ``masked_logits`` are token ids that may never be predicted (e.g. PAD and
    BOS): their logits are set to -inf before the argmax, as FedJAX does.
    """

    def fn(batch, logits):
        labels = batch[label_key]
        if masked_logits:
            logits = logits.at[..., jnp.array(masked_logits)].set(-jnp.inf)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        return correct, _token_weights(labels, pad_id, () if eos_id is None else (eos_id,))

    return Metric(name or ("accuracy" if eos_id is None else "accuracy_no_eos"), fn, label_key)


_BY_NAME: dict[str, Callable[[], Metric]] = {
    "sparse_categorical_crossentropy": sparse_categorical_crossentropy,
    "crossentropy": sparse_categorical_crossentropy,
    "accuracy": accuracy,
    "acc": accuracy,
    "sequence_crossentropy": sequence_crossentropy,
    "sequence_accuracy": sequence_accuracy,
}


def get(metric: str | Metric | MetricFn, *, default_name: str | None = None) -> Metric:
    """Resolves a metric given as a name, a ``Metric`` or a bare function."""
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, str):
        try:
            return _BY_NAME[metric]()
        except KeyError:
            raise ValueError(f"unknown metric {metric!r}; known names: {sorted(_BY_NAME)}.") from None
    if callable(metric):
        return Metric(default_name or getattr(metric, "__name__", "metric"), metric)
    raise TypeError(f"a metric must be a name, a fedtrain.metrics.Metric or a function; got {metric!r}.")
