"""Losses beyond integer-label classification (regression, binary / multi-label, soft labels) against
float64 NumPy, and each one training a tiny federated model end to end."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import fedtrain
from fedtrain import metrics


def _reduce(metric, batch, logits, mask=None):
    """The engine's reduction: sum(values * weights * mask) / sum(weights * mask), in float64."""
    values, weights = metric.fn({k: jnp.asarray(v) for k, v in batch.items()}, jnp.asarray(logits))
    values, weights = np.asarray(values, np.float64), np.asarray(weights, np.float64)
    assert values.shape == weights.shape
    if mask is not None:
        weights = weights * mask.reshape(mask.shape + (1,) * (weights.ndim - 1))
    return float(np.sum(values * weights) / np.sum(weights))


def np_bce(z, y):
    """Binary cross-entropy from logits, per label, in a stable float64 form."""
    z, y = np.asarray(z, np.float64), np.asarray(y, np.float64)
    return np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


RNG = np.random.default_rng(0)
MASK = np.array([1, 1, 1, 1, 0, 1], np.float32)  # one padded example


# ------------------------------------------------------------------------------------- NumPy references
def test_mean_squared_and_absolute_error_match_numpy():
    pred = RNG.normal(size=(6, 3)).astype(np.float32)
    y = RNG.normal(size=(6, 3)).astype(np.float32)
    keep = MASK > 0
    sq = (pred.astype(np.float64) - y) ** 2
    ab = np.abs(pred.astype(np.float64) - y)
    assert _reduce(metrics.mean_squared_error(), {"y": y}, pred, MASK) == pytest.approx(sq.mean(1)[keep].mean(),
                                                                                          rel=1e-6)
    assert _reduce(metrics.mean_absolute_error(), {"y": y}, pred, MASK) == pytest.approx(ab.mean(1)[keep].mean(),
                                                                                           rel=1e-6)
    # one scalar target per example: the model's [B, 1] output against [B] targets
    y1 = y[:, 0]
    assert _reduce(metrics.mean_squared_error(), {"y": y1}, pred[:, :1], MASK) == pytest.approx(
        ((pred[:, 0].astype(np.float64) - y1) ** 2)[keep].mean(), rel=1e-6)
    assert metrics.mean_squared_error().name == "mse" and metrics.mean_absolute_error().name == "mae"
    assert metrics.get("mse").name == metrics.get("mean_squared_error").name == "mse"


def test_binary_crossentropy_matches_numpy_for_multi_label_and_soft_targets():
    logits = RNG.normal(scale=3.0, size=(6, 4)).astype(np.float32)
    logits[0, 0], logits[1, 1] = 40.0, -40.0  # saturated sigmoids stay finite
    hard = (RNG.random((6, 4)) < 0.5).astype(np.float32)
    soft = RNG.random((6, 4)).astype(np.float32)
    keep = MASK > 0
    for y in (hard, soft, hard.astype(np.int32)):
        assert _reduce(metrics.binary_crossentropy(), {"y": y}, logits, MASK) == pytest.approx(
            np_bce(logits, y).mean(1)[keep].mean(), rel=1e-6)
    # a single binary output: [B, 1] logits against [B] labels
    assert _reduce(metrics.binary_crossentropy(), {"y": hard[:, 0]}, logits[:, :1]) == pytest.approx(
        np_bce(logits[:, 0], hard[:, 0]).mean(), rel=1e-6)
    correct = (logits > 0) == (hard > 0.5)
    assert _reduce(metrics.binary_accuracy(), {"y": hard}, logits, MASK) == pytest.approx(
        correct.mean(1)[keep].mean(), rel=1e-6)
    # threshold on the probability: 0.9 -> logit log(9)
    correct = (logits > np.log(9.0)) == (hard > 0.5)
    got = _reduce(metrics.binary_accuracy(threshold=0.9), {"y": hard}, logits)
    assert got == pytest.approx(correct.mean(), rel=1e-6)
    assert metrics.get("binary_crossentropy").class_labels is None


def test_categorical_crossentropy_matches_numpy_for_soft_and_one_hot_labels():
    logits = RNG.normal(scale=2.0, size=(6, 5)).astype(np.float32)
    soft = RNG.random((6, 5))
    soft = (soft / soft.sum(-1, keepdims=True)).astype(np.float32)
    keep = MASK > 0
    ref = -(soft.astype(np.float64) * np_log_softmax(logits)).sum(-1)
    assert _reduce(metrics.categorical_crossentropy(), {"y": soft}, logits, MASK) == pytest.approx(ref[keep].mean(),
                                                                                                   rel=1e-6)
    # one-hot labels give the integer-label cross-entropy
    ids = RNG.integers(0, 5, 6)
    one_hot = np.eye(5, dtype=np.float32)[ids]
    assert _reduce(metrics.categorical_crossentropy(), {"y": one_hot}, logits, MASK) == pytest.approx(
        _reduce(metrics.sparse_categorical_crossentropy(), {"y": ids}, logits, MASK), rel=1e-6)
    assert _reduce(metrics.categorical_accuracy(), {"y": soft}, logits, MASK) == pytest.approx(
        (logits.argmax(-1) == soft.argmax(-1))[keep].mean())
    # per token for sequences: [B, T, C]
    seq_logits = RNG.normal(size=(2, 3, 5)).astype(np.float32)
    seq_soft = np.eye(5, dtype=np.float32)[RNG.integers(0, 5, (2, 3))]
    assert _reduce(metrics.categorical_crossentropy(), {"y": seq_soft}, seq_logits) == pytest.approx(
        -(seq_soft * np_log_softmax(seq_logits)).sum(-1).mean(), rel=1e-6)


@pytest.mark.parametrize("metric,pred_shape,label_shape", [
    (metrics.mean_squared_error(), (4, 3), (4, 2)),
    (metrics.binary_crossentropy(), (4, 3), (4,)),
    (metrics.categorical_crossentropy(), (4, 3), (4,)),
])
def test_shape_mismatches_name_both_shapes(metric, pred_shape, label_shape):
    with pytest.raises(ValueError, match="'y'") as info:
        metric.fn({"y": jnp.zeros(label_shape)}, jnp.zeros(pred_shape))
    assert "float32[4, 3]" in str(info.value) and f"float32{list(label_shape)}" in str(info.value)


# ------------------------------------------------------------------------------------- end to end
class Dense(nnx.Module):
    def __init__(self, features, outputs, *, rngs):
        self.dense = nnx.Linear(features, outputs, rngs=rngs)

    def __call__(self, x):
        return self.dense(x)


def _clients(make_y, num_clients=6, features=4, seed=0):
    rng = np.random.default_rng(seed)
    clients = {}
    for i in range(num_clients):
        x = rng.normal(size=(int(rng.integers(10, 30)), features)).astype(np.float32)
        clients[f"c{i}"] = {"x": x, "y": make_y(x, rng).astype(np.float32)}
    return fedtrain.InMemoryFederatedData(clients)


def _all(data):
    xs = [data.get_client(c)["x"] for c in data.client_ids]
    ys = [data.get_client(c)["y"] for c in data.client_ids]
    return np.concatenate(xs), np.concatenate(ys)


def _fit(data, outputs, loss, metric_names, rounds=25, lr=0.1):
    trainer = fedtrain.FederatedTrainer(Dense(4, outputs, rngs=nnx.Rngs(0)), data,
                                        fedtrain.algorithms.fedavg(optax.sgd(lr)), loss=loss, metrics=metric_names)
    before = trainer.evaluate(data)["loss"]
    trainer.fit(rounds=rounds, clients_per_round=3, batch_size=8, verbose=0)
    x, y = _all(data)
    return trainer, before, trainer.evaluate(data), np.asarray(trainer.predict(x), np.float64), y.astype(np.float64)


def test_regression_with_mean_squared_error_trains_end_to_end():
    w = np.array([1.5, -2.0, 0.5, 1.0])
    data = _clients(lambda x, rng: x @ w + 0.5 + 0.05 * rng.normal(size=len(x)))
    trainer, before, logs, pred, y = _fit(data, 1, "mse", ["mae"], rounds=40)
    assert sorted(logs) == ["loss", "mae"]
    assert logs["loss"] == pytest.approx(np.mean((pred[:, 0] - y) ** 2), rel=1e-5)
    assert logs["mae"] == pytest.approx(np.mean(np.abs(pred[:, 0] - y)), rel=1e-5)
    assert logs["loss"] < 0.02 * before, (before, logs)
    kernel = np.asarray(trainer.params["dense"]["kernel"][...])[:, 0]
    np.testing.assert_allclose(kernel, w, atol=0.1)


def test_multi_label_binary_crossentropy_trains_end_to_end():
    W = np.array([[2.0, -1.0, 0.0], [0.0, 2.0, 1.0], [-1.0, 0.0, 2.0], [1.0, 1.0, -2.0]])
    data = _clients(lambda x, rng: (x @ W > 0))
    _, before, logs, logits, y = _fit(data, 3, "binary_crossentropy", ["binary_accuracy"], lr=0.5)
    assert logs["loss"] == pytest.approx(np_bce(logits, y).mean(), rel=1e-5)
    assert logs["binary_accuracy"] == pytest.approx(np.mean((logits > 0) == (y > 0.5)), rel=1e-6)
    assert logs["loss"] < 0.6 * before and logs["binary_accuracy"] > 0.85, (before, logs)


def test_soft_label_categorical_crossentropy_trains_end_to_end():
    W = np.array([[2.0, -1.0, 0.0], [0.0, 2.0, 1.0], [-1.0, 0.0, 2.0], [1.0, 1.0, -2.0]])

    def soft(x, rng):
        z = x @ W
        p = np.exp(z - z.max(-1, keepdims=True))
        return p / p.sum(-1, keepdims=True)

    data = _clients(soft)
    _, before, logs, logits, y = _fit(data, 3, "categorical_crossentropy", ["categorical_accuracy"], lr=0.5)
    assert logs["loss"] == pytest.approx(-(y * np_log_softmax(logits)).sum(-1).mean(), rel=1e-5)
    assert logs["categorical_accuracy"] == pytest.approx(np.mean(logits.argmax(-1) == y.argmax(-1)), rel=1e-6)
    entropy = -(y * np.log(y)).sum(-1).mean()  # the lowest reachable loss
    assert logs["loss"] - entropy < 0.3 * (before - entropy) and logs["categorical_accuracy"] > 0.85, (before, logs)
