"""Losses and metrics as pure functions of (batch, predictions).

The contract: ``fn(batch, logits) -> (values, weights)``, two arrays of the same
shape whose leading axis is the batch (one row per example: ``[B]``, or ``[B, T]``
per token). ``batch`` is the dict of the batch's features (``batch['y']``, ...),
``logits`` the model's output. The engine reduces them as ``sum(values * weights *
example_mask) / sum(weights * example_mask)``, so a metric is an average over
whatever its weights count: examples for classification, non-PAD tokens for
sequences. Sums and counts are kept separately so that clients, batches and
devices merge exactly. :func:`check_metric_fn` checks a function against the
contract (the trainer does so for the loss and every metric before round 1).

Losses: integer-label ``sparse_categorical_crossentropy`` and
``sequence_crossentropy``; ``categorical_crossentropy`` (one-hot or soft labels),
``binary_crossentropy`` (from logits, one or several labels per example) and
``mean_squared_error`` (regression). Each is also a metric, next to
``accuracy``, ``sequence_accuracy``, ``categorical_accuracy``,
``binary_accuracy`` and ``mean_absolute_error``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import math

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


def _shape(x) -> str:
    return f"{jnp.dtype(x.dtype).name}{list(x.shape)}"


def _per_example(x: jax.Array) -> jax.Array:
    """Mean over every axis after the first: one value per example."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim))) if x.ndim > 1 else x


def _matched(what: str, label_key: str, labels: jax.Array, preds: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(labels, preds)`` of the same shape: a ``[B, 1]`` output against ``[B]`` targets is squeezed."""
    if preds.shape != labels.shape and preds.shape == labels.shape + (1,):
        preds = preds[..., 0]
    if preds.shape != labels.shape:
        raise ValueError(f"{what}: the model's output {_shape(preds)} and the targets {label_key!r} {_shape(labels)} "
                         f"differ in shape; the model needs one output per target (a [B, 1] output also fits [B] "
                         "targets).")
    return labels.astype(jnp.float32), preds.astype(jnp.float32)


def _regression_error(kind: str, error: Callable[[jax.Array], jax.Array], label_key: str, name: str) -> Metric:
    def fn(batch, preds):
        y, p = _matched(kind, label_key, batch[label_key], preds)
        values = _per_example(error(p - y))
        return values, jnp.ones(values.shape, jnp.float32)

    return Metric(name, fn)


def mean_squared_error(label_key: str = "y", name: str = "mse") -> Metric:
    """Squared error against float targets (regression), averaged over each example's targets:
    ``mean((pred - y)^2)``; the model's output has the targets' shape (``[B, 1]`` fits ``[B]``)."""
    return _regression_error("mean_squared_error", jnp.square, label_key, name)


def mean_absolute_error(label_key: str = "y", name: str = "mae") -> Metric:
    """Absolute error against float targets, averaged over each example's targets."""
    return _regression_error("mean_absolute_error", jnp.abs, label_key, name)


def binary_crossentropy(label_key: str = "y", name: str = "binary_crossentropy") -> Metric:
    """Sigmoid cross-entropy from logits against labels in ``[0, 1]`` (0/1 or soft), averaged over each
    example's labels: one binary output (``[B, 1]`` logits, ``[B]`` labels) or several (multi-label,
    ``[B, L]`` both)."""

    def fn(batch, logits):
        y, z = _matched("binary_crossentropy", label_key, batch[label_key], logits)
        values = _per_example(optax.sigmoid_binary_cross_entropy(z, y))
        return values, jnp.ones(values.shape, jnp.float32)

    return Metric(name, fn)


def binary_accuracy(label_key: str = "y", threshold: float = 0.5, name: str = "binary_accuracy") -> Metric:
    """Fraction of an example's labels predicted right, a label being on when ``sigmoid(logit) >
    threshold`` (and true when above 0.5)."""
    if not 0.0 < float(threshold) < 1.0:
        raise ValueError(f"binary_accuracy threshold must be in (0, 1), got {threshold}.")
    cut = math.log(threshold / (1.0 - threshold))  # sigmoid(z) > t  <=>  z > logit(t)

    def fn(batch, logits):
        y, z = _matched("binary_accuracy", label_key, batch[label_key], logits)
        values = _per_example(((z > cut) == (y > 0.5)).astype(jnp.float32))
        return values, jnp.ones(values.shape, jnp.float32)

    return Metric(name, fn)


def _check_distribution(what: str, label_key: str, labels: jax.Array, logits: jax.Array) -> None:
    if labels.shape != logits.shape:
        raise ValueError(f"{what}: labels {label_key!r} {_shape(labels)} need the logits' shape {_shape(logits)} "
                         "(one-hot or soft labels over the last axis); for integer class ids use "
                         "sparse_categorical_crossentropy / accuracy.")


def categorical_crossentropy(label_key: str = "y", name: str = "categorical_crossentropy") -> Metric:
    """Softmax cross-entropy against one-hot or soft labels (a distribution over the last axis, the
    logits' shape): ``-sum(y * log_softmax(logits))`` per example (per token for ``[B, T, C]``)."""

    def fn(batch, logits):
        labels = batch[label_key]
        _check_distribution("categorical_crossentropy", label_key, labels, logits)
        values = optax.softmax_cross_entropy(logits.astype(jnp.float32), labels.astype(jnp.float32))
        return values, jnp.ones(values.shape, jnp.float32)

    return Metric(name, fn)


def categorical_accuracy(label_key: str = "y", name: str = "categorical_accuracy") -> Metric:
    """Whether the logits' argmax is the labels' argmax (one-hot or soft labels)."""

    def fn(batch, logits):
        labels = batch[label_key]
        _check_distribution("categorical_accuracy", label_key, labels, logits)
        values = (jnp.argmax(logits, -1) == jnp.argmax(labels, -1)).astype(jnp.float32)
        return values, jnp.ones(values.shape, jnp.float32)

    return Metric(name, fn)


_BY_NAME: dict[str, Callable[[], Metric]] = {
    "sparse_categorical_crossentropy": sparse_categorical_crossentropy,
    "crossentropy": sparse_categorical_crossentropy,
    "accuracy": accuracy,
    "acc": accuracy,
    "sequence_crossentropy": sequence_crossentropy,
    "sequence_accuracy": sequence_accuracy,
    "categorical_crossentropy": categorical_crossentropy,
    "categorical_accuracy": categorical_accuracy,
    "binary_crossentropy": binary_crossentropy,
    "binary_accuracy": binary_accuracy,
    "mean_squared_error": mean_squared_error,
    "mse": mean_squared_error,
    "mean_absolute_error": mean_absolute_error,
    "mae": mean_absolute_error,
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


# ---------------------------------------------------------------------- the contract, checked
CONTRACT = ("fn(batch, logits) -> (values, weights): two arrays of the same shape whose leading axis is the batch "
            "(one value per example, [B], or per token, [B, T]); the result is sum(values * weights) / sum(weights) "
            "over the real examples")


class MetricContractError(TypeError, ValueError):
    """A loss or metric that does not follow :data:`CONTRACT` (or fails on the batch it is given)."""


def _describe(out) -> str:
    if isinstance(out, jax.ShapeDtypeStruct) or hasattr(out, "shape") and hasattr(out, "dtype"):
        return f"an array {_shape(out)}"
    if isinstance(out, (tuple, list)):
        kind = type(out).__name__
        return f"a {kind} of {len(out)}: ({', '.join(_describe_leaf(x) for x in out)})"
    if isinstance(out, Mapping):
        return f"a dict with keys {sorted(map(str, out))}"
    return f"{type(out).__name__} {out!r}"


def _describe_leaf(x) -> str:
    return _shape(x) if hasattr(x, "shape") and hasattr(x, "dtype") else _describe(x)


def _batch_shapes(batch) -> dict[str, str]:
    return {k: _shape(v) for k, v in batch.items() if k != "mask" and hasattr(v, "shape")}


def check_metric_fn(name: str, fn: MetricFn, batch: Batch, logits, *, kind: str = "metric"
                    ) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
    """Runs ``fn(batch, logits)`` abstractly (``jax.eval_shape``: nothing is computed) and checks the
    contract; returns the shapes of ``(values, weights)``. ``batch`` and ``logits`` may be arrays or
    ``jax.ShapeDtypeStruct``. Raises :class:`MetricContractError` (a ``TypeError`` and a ``ValueError``)
    naming the metric, the contract and what ``fn`` returned (or raised)."""
    where = f"{kind} {name!r}"
    logits_shape = getattr(logits, "shape", ())
    try:
        out = jax.eval_shape(fn, batch, logits)
    except Exception as e:
        raise MetricContractError(
            f"{where} fails on a batch {_batch_shapes(batch)} with logits {_describe_leaf(logits)}: "
            f"{type(e).__name__}: {e}. The contract is {CONTRACT}.") from e
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise MetricContractError(f"{where} must return (values, weights); it returned {_describe(out)}. "
                                  f"The contract is {CONTRACT}.")
    values, weights = out
    if not all(hasattr(x, "shape") and hasattr(x, "dtype") for x in out):
        raise MetricContractError(f"{where} must return two arrays (values, weights); it returned {_describe(out)}. "
                                  f"The contract is {CONTRACT}.")
    if values.shape != weights.shape:
        raise MetricContractError(f"{where} returned values {_shape(values)} and weights {_shape(weights)}: they "
                                  f"need the same shape. The contract is {CONTRACT}.")
    mask_shape = getattr(batch.get("mask") if isinstance(batch, Mapping) else None, "shape", ())
    batch_size = mask_shape[0] if len(mask_shape) else logits_shape[0] if len(logits_shape) else None
    if values.ndim == 0 or (batch_size is not None and values.shape[0] != batch_size):
        raise MetricContractError(
            f"{where} returned values {_shape(values)} and weights {_shape(weights)}: their leading axis must be the "
            f"batch of {batch_size} examples (one value per example, not a mean over the batch). "
            f"The contract is {CONTRACT}.")
    return values, weights


def check_model_metrics(model, batch: Batch, logits) -> None:
    """Checks ``model.loss`` and every metric of ``model.metrics`` (a :class:`fedtrain.models.Model`, or
    anything with those attributes) on ``batch`` and ``logits`` (arrays or ``jax.ShapeDtypeStruct``),
    as the trainer does before round 1; see :func:`check_metric_fn`."""
    check_metric_fn(model.loss.name, model.loss.fn, batch, logits, kind="loss")
    for metric in model.metrics:
        check_metric_fn(metric.name, metric.fn, batch, logits)
