"""Losses and metrics against plain numpy, with padding and masks."""

import re

import jax
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


# ------------------------------------------------------------------------------------- the contract
def _abstract(batch_size=8, classes=3):
    batch = {"x": jax.ShapeDtypeStruct((batch_size, 4), jnp.float32),
             "y": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
             "mask": jax.ShapeDtypeStruct((batch_size,), jnp.float32)}
    return batch, jax.ShapeDtypeStruct((batch_size, classes), jnp.float32)


@pytest.mark.parametrize("fn,returned", [
    (lambda b, l: jnp.mean(l), r"an array float32\[\]"),
    (lambda b, l: (l[:, 0], l[:, 0], l[:, 0]), r"a tuple of 3: \(float32\[8\], float32\[8\], float32\[8\]\)"),
    (lambda b, l: {"values": l[:, 0]}, r"a dict with keys \['values'\]"),
    (lambda b, l: (jnp.mean(l), jnp.float32(1.0)), r"values float32\[\] and weights float32\[\]"),
    (lambda b, l: (l[:, 0], jnp.ones((8, 1))), r"values float32\[8\] and weights float32\[8, 1\]"),
    (lambda b, l: (l[:4, 0], jnp.ones(4)), r"leading axis.*batch of 8"),
], ids=["one_array", "three", "dict", "scalars", "shapes_differ", "not_per_example"])
def test_check_metric_fn_names_the_metric_the_contract_and_what_came_back(fn, returned):
    batch, logits = _abstract()
    with pytest.raises(metrics.MetricContractError, match=r"metric 'bad'") as info:
        metrics.check_metric_fn("bad", fn, batch, logits)
    message = str(info.value)
    assert re.search(returned, message), message
    assert "fn(batch, logits) -> (values, weights)" in message
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)


def test_check_metric_fn_reports_an_error_inside_the_metric():
    batch, logits = _abstract()
    match = r"metric 'labels' fails on a batch \{'x'.*KeyError: 'label'.*contract"
    with pytest.raises(metrics.MetricContractError, match=match):
        metrics.check_metric_fn("labels", lambda b, l: (l[:, 0], b["label"]), batch, logits)


def test_check_metric_fn_accepts_the_builtin_metrics_on_abstract_and_concrete_input():
    batch, logits = _abstract()
    for m in (metrics.sparse_categorical_crossentropy(), metrics.accuracy()):
        values, weights = metrics.check_metric_fn(m.name, m.fn, batch, logits)
        assert values.shape == weights.shape == (8,)
    concrete = {"y": jnp.asarray([0, 1, 2]), "x": jnp.zeros((3, 4))}
    metrics.check_metric_fn("acc", metrics.accuracy().fn, concrete, jnp.zeros((3, 3)))
    seq = {"y": jax.ShapeDtypeStruct((2, 5), jnp.int32)}
    values, _ = metrics.check_metric_fn("seq", metrics.sequence_crossentropy().fn, seq,
                                        jax.ShapeDtypeStruct((2, 5, 7), jnp.float32))
    assert values.shape == (2, 5)


def test_check_model_metrics_checks_the_loss_and_every_metric():
    from fedtrain.models.adapter import Model

    batch, logits = _abstract()
    good = Model(None, None, metrics.sparse_categorical_crossentropy(), (metrics.accuracy(),))
    metrics.check_model_metrics(good, batch, logits)
    bad = good._replace(metrics=(metrics.accuracy(), metrics.Metric("top1", lambda b, l: jnp.mean(l))))
    with pytest.raises(metrics.MetricContractError, match="metric 'top1'"):
        metrics.check_model_metrics(bad, batch, logits)
    with pytest.raises(metrics.MetricContractError, match="loss 'loss'"):
        metrics.check_model_metrics(good._replace(loss=metrics.Metric("loss", lambda b, l: jnp.mean(l))), batch, logits)


def test_trainer_rejects_a_malformed_metric_before_training():
    import optax
    from flax import nnx

    import fedtrain
    from tests.conftest import Linear, make_clients

    data = fedtrain.InMemoryFederatedData(make_clients(num_clients=4, features=4))

    def mean_error(batch, logits):  # returns the batch mean, not per-example (values, weights)
        return jnp.mean(jnp.argmax(logits, -1) != batch["y"])

    trainer = fedtrain.FederatedTrainer(Linear(rngs=nnx.Rngs(0)), data, fedtrain.algorithms.fedavg(optax.sgd(0.1)),
                                        metrics=["accuracy", mean_error])
    with pytest.raises(TypeError, match=r"metric 'mean_error' must return.*it returned an array (bool|float32)\[\]"):
        trainer.fit(rounds=1, clients_per_round=2, batch_size=4, verbose=0)
    assert trainer.round == 0 and trainer.engine.compilations == 0
