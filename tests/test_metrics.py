"""Losses and metrics against plain numpy, with padding and masks."""

import jax.numpy as jnp
import numpy as np
import pytest

from fedtrain import metrics
from fedtrain.models.adapter import metric_sums


def _reduce(metric, batch, logits, mask=None):
    values, weights = metric.fn(batch, jnp.asarray(logits))
    if mask is not None:
        weights = weights * mask.reshape(mask.shape + (1,) * (weights.ndim - 1))
    return float(jnp.sum(values * weights) / jnp.sum(weights))


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_sequence_metrics_ignore_pad_and_optionally_eos():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 6)).astype(np.float32)
    y = np.array([[3, 4, 2, 0, 0], [5, 1, 3, 4, 2]])  # PAD=0, EOS=2
    batch = {"y": jnp.asarray(y)}
    keep = y != 0
    nll = -np.take_along_axis(_log_softmax(logits), y[..., None], -1)[..., 0]
    assert _reduce(metrics.sequence_crossentropy(), batch, logits) == pytest.approx(nll[keep].mean(), rel=1e-5)
    correct = logits.argmax(-1) == y
    assert _reduce(metrics.sequence_accuracy(), batch, logits) == pytest.approx(correct[keep].mean())
    keep_no_eos = keep & (y != 2)
    acc_no_eos = metrics.sequence_accuracy(eos_id=2)
    assert acc_no_eos.name == "accuracy_no_eos"
    assert _reduce(acc_no_eos, batch, logits) == pytest.approx(correct[keep_no_eos].mean())
    masked = logits.copy()
    masked[..., [0, 1]] = -np.inf
    assert _reduce(metrics.sequence_accuracy(masked_logits=(0, 1)), batch, logits) == pytest.approx(
        (masked.argmax(-1) == y)[keep].mean())


def test_example_mask_removes_padded_examples():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 3)).astype(np.float32)
    y = np.array([0, 2, 1, 1])
    mask = np.array([1, 1, 0, 0], np.float32)
    nll = -np.take_along_axis(_log_softmax(logits), y[:, None], -1)[:, 0]
    got = _reduce(metrics.sparse_categorical_crossentropy(), {"y": jnp.asarray(y)}, logits, mask)
    assert got == pytest.approx(nll[:2].mean(), rel=1e-5)


def test_metric_sums_uses_the_batch_mask():
    from fedtrain.models.adapter import Model

    model = Model(None, None, metrics.sparse_categorical_crossentropy(), (metrics.accuracy(),))
    logits = jnp.asarray([[2.0, 0.0], [0.0, 2.0], [5.0, 0.0]])
    batch = {"y": jnp.asarray([0, 0, 1]), "mask": jnp.asarray([1.0, 1.0, 0.0])}
    sums = metric_sums(model, batch, logits)
    assert float(sums["accuracy"][0]) == 1.0 and float(sums["accuracy"][1]) == 2.0
    assert float(sums["loss"][1]) == 2.0


def test_get_resolves_names_and_rejects_unknown():
    assert metrics.get("accuracy").name == "accuracy"
    assert metrics.get(lambda b, l: (l, l), default_name="mine").name == "mine"
    with pytest.raises(ValueError, match="unknown metric 'acuracy'"):
        metrics.get("acuracy")
