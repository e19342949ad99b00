"""Stack Overflow LSTM and CIFAR-100 models: parameter counts against the published sizes, shapes, masking."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import fedtrain
from fedtrain.models import cifar, stackoverflow
from fedtrain.models.cifar import CifarLogistic, Conv, ResNet18, cifar_model
from fedtrain.models.stackoverflow import StackOverflowLSTM, stackoverflow_model


def num_params(module):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def abstract(cls, *args, **kwargs):
    """The module with shapes only (no initialisation compute)."""
    return nnx.eval_shape(lambda: cls(*args, **kwargs, rngs=nnx.Rngs(0)))


def test_stackoverflow_parameter_count_matches_fedjax():
    # FedJAX stackoverflow_test: create_lstm_model() has 4,050,748 parameters.
    model = abstract(StackOverflowLSTM)
    assert model.num_outputs == 10_004 == stackoverflow.full_vocab_size()
    assert num_params(model) == 4_050_748
    emb, lstm, proj, out = 10_004 * 96, 4 * (96 * 670 + 670 * 670 + 670), 670 * 96 + 96, 96 * 10_004 + 10_004
    assert emb + lstm + proj + out == 4_050_748
    assert stackoverflow.oov_ids() == (10_003,)


def test_stackoverflow_masks_pad_and_bos_logits():
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 54, (3, 5)), jnp.int32)
    module = StackOverflowLSTM(vocab_size=50, embed_size=8, hidden_size=16, rngs=nnx.Rngs(0))
    logits = np.asarray(module(tokens))
    assert logits.shape == (3, 5, 54)
    np.testing.assert_array_equal(logits[..., stackoverflow.PAD], -1e9)
    np.testing.assert_array_equal(logits[..., stackoverflow.BOS], -1e9)
    rest = logits[..., 2:]
    assert np.all(np.isfinite(rest)) and np.all(np.abs(rest) < 1e3)
    tanh = StackOverflowLSTM(vocab_size=50, embed_size=8, hidden_size=16, output_tanh=True, rngs=nnx.Rngs(0))
    assert num_params(tanh) == num_params(module)
    assert not np.allclose(np.asarray(tanh(tokens)), logits)


def test_stackoverflow_model_metrics():
    model = stackoverflow_model(vocab_size=20, embed_size=4, hidden_size=8)
    assert [m.name for m in model.metrics] == ["accuracy_in_vocab", "accuracy_no_eos"]
    x = jnp.asarray([[1, 5, 6, 0]], jnp.int32)
    y = jnp.asarray([[5, 6, 2, 0]], jnp.int32)
    logits = jnp.zeros((1, 4, 24)).at[0, 0, 5].set(5.0).at[0, 1, 23].set(5.0)  # right, OOV guess, EOS target
    batch = {"x": x, "y": y}
    in_vocab = model.metrics[0].fn(batch, logits)
    assert float(jnp.sum(in_vocab[1])) == 2.0  # PAD and EOS targets excluded
    assert float(jnp.sum(in_vocab[0] * in_vocab[1])) == 1.0
    params_logits = model.apply(model.init_params, x, None, False)
    assert params_logits.shape == (1, 4, 24)


def test_cifar_parameter_counts():
    # Keras create_resnet18(input_shape=(24, 24, 3), num_classes=100) of google-research/federated:
    # 11,227,812 = torchvision resnet18 (11,689,512 for 1000 classes) with a 100-class head.
    resnet = abstract(ResNet18)
    assert num_params(resnet) == 11_227_812 == 11_689_512 - 513 * 900
    assert num_params(abstract(ResNet18, stage_strides=(1, 2, 2, 2))) == 11_227_812
    assert num_params(abstract(ResNet18, 10)) == 11_227_812 - 513 * 90
    assert num_params(abstract(CifarLogistic)) == 24 * 24 * 3 * 100 + 100  # FedJAX: 172,900
    norms = [v for path, v in nnx.iter_graph(resnet) if isinstance(v, nnx.GroupNorm)]
    assert len(norms) == 1 + 15 + 3 + 1 and all(n.num_groups == 2 for n in norms)


@pytest.mark.parametrize("kernel,stride,size", [(7, 2, 24), (3, 1, 6), (3, 2, 7), (1, 2, 6), (3, 1, 5)])
def test_im2col_conv_equals_lax_conv(kernel, stride, size):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, size, size, 4)), jnp.float32)
    a = Conv(4, 5, kernel, stride, impl="lax", rngs=nnx.Rngs(1))
    b = Conv(4, 5, kernel, stride, impl="im2col", rngs=nnx.Rngs(1))
    assert a(x).shape == (2, -(-size // stride), -(-size // stride), 5)
    np.testing.assert_allclose(np.asarray(a(x)), np.asarray(b(x)), atol=1e-5)


def test_resnet_shapes_and_stage_resolution():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 24, 24, 3)), jnp.float32)
    call = nnx.jit(lambda module, images: module(images))
    assert call(ResNet18(100, width=4, blocks=(1, 1, 1, 1), rngs=nnx.Rngs(0)), x).shape == (2, 100)
    strided = ResNet18(10, width=4, blocks=(1, 1), stage_strides=(1, 2), rngs=nnx.Rngs(0))
    assert call(strided, x).shape == (2, 10) and strided.blocks[1].conv1.stride == 2
    assert cifar.max_pool_3x3_2(jnp.ones((1, 12, 12, 1))).shape == (1, 6, 6, 1)
    assert CifarLogistic(rngs=nnx.Rngs(0))(x).shape == (2, 100)
    with pytest.raises(ValueError, match="unknown CIFAR model"):
        cifar_model("vgg")
    with pytest.raises(ValueError, match="unknown convolution impl"):
        Conv(3, 4, 3, impl="winograd", rngs=nnx.Rngs(0))


def test_small_resnet_and_so_lstm_train_with_fedavg():
    rng = np.random.default_rng(0)
    images = {f"c{i}": {"x": rng.normal(size=(6, 24, 24, 3)).astype(np.float32),
                        "y": rng.integers(0, 5, 6).astype(np.int32)} for i in range(4)}
    model = cifar_model(num_classes=5, width=4, blocks=(1,))
    trainer = fedtrain.FederatedTrainer(model, fedtrain.InMemoryFederatedData(images),
                                        fedtrain.algorithms.fedopt(optax.sgd(0.1), optax.sgd(1.0)), seed=0)
    history = trainer.fit(rounds=2, clients_per_round=2, batch_size=3, verbose=0)
    assert np.isfinite(history.history["loss"]).all()

    tokens = {f"c{i}": {"x": rng.integers(1, 24, (5, 6)).astype(np.int32),
                        "y": rng.integers(2, 24, (5, 6)).astype(np.int32)} for i in range(4)}
    model = stackoverflow_model(vocab_size=20, embed_size=4, hidden_size=8)
    trainer = fedtrain.FederatedTrainer(model, fedtrain.InMemoryFederatedData(tokens),
                                        fedtrain.algorithms.fedopt(optax.sgd(0.5), optax.sgd(1.0)), seed=0)
    history = trainer.fit(rounds=2, clients_per_round=2, batch_size=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
