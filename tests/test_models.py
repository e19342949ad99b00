"""Models of the standard tasks: parameter counts, shapes, numerics against references, dropout, training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import fedtrain
from fedtrain.models import emnist, shakespeare
from fedtrain.models.emnist import EmnistCNN, EmnistDense, EmnistLogistic, emnist_model
from fedtrain.models.lstm import LSTMLayer, StackedLSTM
from fedtrain.models.shakespeare import ShakespeareLSTM, shakespeare_model


def num_params(module):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def images(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 28, 28, 1)).astype(np.float32)


def test_parameter_counts():
    assert num_params(ShakespeareLSTM(rngs=nnx.Rngs(0))) == 820_522
    assert num_params(EmnistCNN(62, rngs=nnx.Rngs(0))) == 1_206_590
    assert num_params(EmnistCNN(10, rngs=nnx.Rngs(0))) == 1_199_882
    assert num_params(EmnistDense(62, rngs=nnx.Rngs(0))) == 784 * 200 + 200 + 200 * 200 + 200 + 200 * 62 + 62
    assert num_params(EmnistLogistic(62, rngs=nnx.Rngs(0))) == 784 * 62 + 62
    layer = LSTMLayer(5, 7, rngs=nnx.Rngs(0))
    assert num_params(layer) == 4 * (5 * 7 + 7 * 7 + 7)
    assert layer.kernel.shape == (5, 28) and layer.recurrent_kernel.shape == (7, 28) and layer.bias.shape == (28,)
    conv = EmnistCNN(rngs=nnx.Rngs(0)).conv2
    assert conv.kernel.shape == (3, 3, 32, 64) and conv.bias.shape == (64,)


def test_output_shapes():
    x = jnp.asarray(images(3))
    assert EmnistCNN(62, rngs=nnx.Rngs(0))(x).shape == (3, 62)
    assert EmnistDense(10, rngs=nnx.Rngs(0))(x).shape == (3, 10)
    assert EmnistLogistic(62, rngs=nnx.Rngs(0))(x).shape == (3, 62)
    assert StackedLSTM(4, 6, 3, rngs=nnx.Rngs(0))(jnp.ones((2, 5, 4))).shape == (2, 5, 6)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 90, (2, 11)), jnp.int32)
    assert ShakespeareLSTM(hidden_size=16, rngs=nnx.Rngs(0))(tokens).shape == (2, 11, 90)


def test_shakespeare_masks_pad_logits_only():
    assert (shakespeare.VOCAB_SIZE, shakespeare.PAD, shakespeare.BOS, shakespeare.EOS, shakespeare.OOV) == (
        90, 0, 1, 2, 89)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 90, (3, 7)), jnp.int32)
    logits = np.asarray(ShakespeareLSTM(hidden_size=16, rngs=nnx.Rngs(0))(tokens))
    np.testing.assert_array_equal(logits[..., shakespeare.PAD], -1e9)
    assert np.all(logits[..., shakespeare.BOS] > -1e8)  # BOS follows every EOS in the joined stream
    rest = logits[..., 2:]
    assert np.all(np.isfinite(rest)) and np.all(np.abs(rest) < 1e3)
    assert not np.any(np.argmax(logits, -1) == shakespeare.PAD)


def test_shakespeare_initial_loss_on_real_data_is_near_uniform():
    from fedtrain.datasets.shakespeare import load_data
    from fedtrain.models.adapter import loss_and_metrics
    batch = {k: jnp.asarray(v[:8]) for k, v in load_data("train").get_client("HAMLET_HAMLET").items()}
    model = shakespeare.shakespeare_model(hidden_size=32)
    loss, sums = loss_and_metrics(model, model.init_params, batch, None, False)
    assert abs(float(loss) - np.log(shakespeare.VOCAB_SIZE - 1)) < 0.5  # every target, BOS included, is reachable


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _numpy_lstm(x, layers):
    """Step-by-step reference; ``layers`` is a list of (W_ih, W_hh, b) in float64, gates (i, f, g, o)."""
    h_seq = x.astype(np.float64)
    for w_ih, w_hh, b in layers:
        hidden = w_hh.shape[0]
        h = np.zeros((x.shape[0], hidden))
        c = np.zeros((x.shape[0], hidden))
        outs = []
        for t in range(x.shape[1]):
            z = h_seq[:, t] @ w_ih + h @ w_hh + b
            i, f, g, o = np.split(z, 4, axis=-1)
            c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
            h = _sigmoid(o) * np.tanh(c)
            outs.append(h)
        h_seq = np.stack(outs, 1)
    return h_seq


@pytest.mark.parametrize("unroll", [1, 3])
def test_lstm_matches_step_by_step_reference(unroll):
    model = StackedLSTM(5, 12, 2, unroll=unroll, rngs=nnx.Rngs(3))
    # Non-trivial biases so every gate's bias is exercised.
    rng = np.random.default_rng(0)
    for layer in model.layers:
        layer.bias[...] = jnp.asarray(rng.normal(scale=0.5, size=layer.bias.shape), jnp.float32)
    x = rng.normal(size=(3, 9, 5)).astype(np.float32)
    out = np.asarray(model(jnp.asarray(x)))
    ref = _numpy_lstm(x, [(np.asarray(l.kernel[...], np.float64), np.asarray(l.recurrent_kernel[...], np.float64),
                           np.asarray(l.bias[...], np.float64)) for l in model.layers])
    np.testing.assert_allclose(out, ref, atol=1e-5)
    single = model.layers[0]
    np.testing.assert_allclose(np.asarray(single(jnp.asarray(x))), _numpy_lstm(x, [(
        np.asarray(single.kernel[...], np.float64), np.asarray(single.recurrent_kernel[...], np.float64),
        np.asarray(single.bias[...], np.float64))]), atol=1e-5)


def test_lstm_initialisation():
    layer = LSTMLayer(8, 16, rngs=nnx.Rngs(0))
    w_hh = np.asarray(layer.recurrent_kernel[...])
    for gate in range(4):
        block = w_hh[:, gate * 16:(gate + 1) * 16]
        np.testing.assert_allclose(block.T @ block, np.eye(16), atol=1e-5)
    bias = np.asarray(layer.bias[...])
    np.testing.assert_array_equal(bias[16:32], 1.0)
    np.testing.assert_array_equal(np.delete(bias, np.s_[16:32]), 0.0)


@pytest.mark.parametrize("cin,cout", [(1, 4), (3, 5)])
def test_im2col_conv_matches_lax_conv(cin, cout):
    conv = emnist.Conv2D(cin, cout, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(cin)
    conv.bias[...] = jnp.asarray(rng.normal(size=(cout,)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(2, 10, 9, cin)), jnp.float32)
    expected = jax.lax.conv_general_dilated(x, conv.kernel[...], (1, 1), "VALID",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            precision=jax.lax.Precision.HIGHEST) + conv.bias[...]
    got = conv(x)
    assert got.shape == (2, 8, 7, cout)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)


def test_max_pool_matches_reduce_window():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 6, 3)), jnp.float32)
    expected = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    np.testing.assert_array_equal(np.asarray(emnist.max_pool_2x2(x)), np.asarray(expected))


def test_dropout_active_in_train_and_inactive_in_eval():
    x = jnp.asarray(images(4))
    model = EmnistCNN(rngs=nnx.Rngs(0, dropout=1))
    plain = EmnistCNN(dropout_rate=0.0, dense_dropout_rate=0.0, rngs=nnx.Rngs(5))
    nnx.update(plain, nnx.state(model, nnx.Param))
    model.train()
    a, b = np.asarray(model(x)), np.asarray(model(x))
    assert not np.allclose(a, b)
    model.eval()
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(plain(x)), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(model(x)))
    # Through the adapter: train mode depends on the rng, eval mode does not.
    fns = emnist_model(seed=0)
    t1 = fns.apply(fns.init_params, x, jax.random.key(1), True)
    t2 = fns.apply(fns.init_params, x, jax.random.key(2), True)
    e1 = fns.apply(fns.init_params, x, jax.random.key(1), False)
    e2 = fns.apply(fns.init_params, x, jax.random.key(2), False)
    assert not np.allclose(np.asarray(t1), np.asarray(t2))
    np.testing.assert_array_equal(np.asarray(e1), np.asarray(e2))


def _image_clients(num_clients, classes, seed=0):
    rng = np.random.default_rng(seed)
    return {f"c{i}": {"x": images(int(rng.integers(3, 9)), seed + i),
                      "y": rng.integers(0, classes, size=0).astype(np.int32)} for i in range(num_clients)}


def _with_labels(clients, classes, seed=0):
    rng = np.random.default_rng(seed)
    return {cid: {"x": c["x"], "y": rng.integers(0, classes, len(c["x"])).astype(np.int32)}
            for cid, c in clients.items()}


@pytest.mark.parametrize("kind", ["cnn", "dense", "logistic"])
def test_emnist_one_round(kind):
    data = fedtrain.InMemoryFederatedData(_with_labels(_image_clients(4, 10), 10))
    trainer = fedtrain.FederatedTrainer(emnist_model(kind, 10, seed=0), data,
                                        fedtrain.algorithms.fedavg(optax.sgd(0.05)), seed=0)
    history = trainer.fit(rounds=1, clients_per_round=2, batch_size=4, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert np.isfinite(history.history["accuracy"][0])


def test_shakespeare_one_round():
    rng = np.random.default_rng(0)
    clients = {}
    for i in range(4):
        n = int(rng.integers(2, 6))
        x = rng.integers(3, 89, (n, 12)).astype(np.int32)
        x[:, 0] = shakespeare.BOS
        y = np.concatenate([x[:, 1:], np.full((n, 1), shakespeare.EOS, np.int32)], 1)
        x[0, 8:], y[0, 7:] = shakespeare.PAD, shakespeare.PAD
        clients[f"role{i}"] = {"x": x, "y": y}
    data = fedtrain.InMemoryFederatedData(clients)
    model = shakespeare_model(hidden_size=16, seed=0)
    assert [m.name for m in model.metrics] == ["accuracy", "accuracy_no_eos"]
    trainer = fedtrain.FederatedTrainer(model, data, fedtrain.algorithms.fedavg(optax.sgd(0.5)), seed=0)
    history = trainer.fit(rounds=1, clients_per_round=2, batch_size=2, verbose=0)
    for key in ["loss", "accuracy", "accuracy_no_eos"]:
        assert np.isfinite(history.history[key][0]), key
    assert history.history["loss"][0] == pytest.approx(np.log(88), rel=0.2)
    # An nnx module with explicit loss/metrics works too.
    trainer = fedtrain.FederatedTrainer(
        ShakespeareLSTM(hidden_size=8, num_layers=1, rngs=nnx.Rngs(0)), data,
        fedtrain.algorithms.fedavg(optax.sgd(0.5)),
        loss=fedtrain.metrics.sequence_crossentropy(pad_id=shakespeare.PAD),
        metrics=[fedtrain.metrics.sequence_accuracy(pad_id=shakespeare.PAD)])
    assert np.isfinite(trainer.fit(rounds=1, clients_per_round=2, batch_size=2, verbose=0).history["loss"][0])
