"""EMNIST models: the CNN of Reddi et al. 2021 / FedJAX, a 2-layer MLP and logistic regression.

Images are ``[B, 28, 28, 1]`` float32 under the batch key ``"x"``. The CNN's
3x3 convolutions are computed as im2col (patches, then one matmul), with
kernels stored as ``[3, 3, C_in, C_out]`` plus a bias, like ``nnx.Conv``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fedtrain import metrics as metrics_lib
from fedtrain.models.adapter import Model, from_nnx


def extract_patches(x: jax.Array, kh: int, kw: int) -> jax.Array:
    """VALID ``kh x kw`` patches of ``[B, H, W, C]`` -> ``[B, H-kh+1, W-kw+1, kh*kw*C]``, ordered (dy, dx, c)."""
    out_h, out_w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    cols = [x[:, dy:dy + out_h, dx:dx + out_w, :] for dy in range(kh) for dx in range(kw)]
    return jnp.concatenate(cols, axis=-1)


class Conv2D(nnx.Module):
    """VALID, stride-1 convolution via im2col; parameters ``kernel [kh, kw, C_in, C_out]`` and ``bias``."""

    def __init__(self, in_features: int, out_features: int, kernel_size: tuple[int, int] = (3, 3), *,
                 rngs: nnx.Rngs):
        shape = (*kernel_size, in_features, out_features)
        self.kernel_size = tuple(kernel_size)
        self.kernel = nnx.Param(jax.nn.initializers.lecun_normal()(rngs.params(), shape))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        kernel = self.kernel[...]
        patches = extract_patches(x, kh, kw)
        return patches @ kernel.reshape(-1, kernel.shape[-1]) + self.bias[...]


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pooling, stride 2 (odd trailing rows/columns dropped)."""
    b, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2, :]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _dropout(rate: float, rngs: nnx.Rngs):
    """Dropout on a stream tagged ``dropout`` (drawn from ``rngs``' dropout stream, else its default one),
    so that :func:`fedtrain.models.adapter.from_nnx` reseeds it every step."""
    if not rate:
        return None
    return nnx.Dropout(rate, rngs=nnx.RngStream(rngs["dropout"](), tag="dropout"))


class EmnistCNN(nnx.Module):
    """Conv3x3-32 -> Conv3x3-64 -> maxpool 2 -> dropout -> Dense 128 -> dropout -> Dense ``num_classes``.

    1,206,590 parameters for 62 classes, 1,199,882 for 10.
    """

    def __init__(self, num_classes: int = 62, *, dropout_rate: float = 0.25, dense_dropout_rate: float = 0.5,
                 rngs: nnx.Rngs):
        self.conv1 = Conv2D(1, 32, rngs=rngs)
        self.conv2 = Conv2D(32, 64, rngs=rngs)
        self.drop1 = _dropout(dropout_rate, rngs)
        self.dense1 = nnx.Linear(12 * 12 * 64, 128, rngs=rngs)
        self.drop2 = _dropout(dense_dropout_rate, rngs)
        self.dense2 = nnx.Linear(128, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.reshape(x, (x.shape[0], 28, 28, 1))
        x = nnx.relu(self.conv1(x))
        x = nnx.relu(self.conv2(x))
        x = max_pool_2x2(x)
        if self.drop1 is not None:
            x = self.drop1(x)
        x = x.reshape(x.shape[0], -1)
        x = nnx.relu(self.dense1(x))
        if self.drop2 is not None:
            x = self.drop2(x)
        return self.dense2(x)


class EmnistDense(nnx.Module):
    """Two hidden ReLU layers of ``hidden`` units (McMahan et al. 2017's 2NN)."""

    def __init__(self, num_classes: int = 62, hidden: int = 200, *, rngs: nnx.Rngs):
        self.dense1 = nnx.Linear(28 * 28, hidden, rngs=rngs)
        self.dense2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.dense3 = nnx.Linear(hidden, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.reshape(x, (x.shape[0], -1))
        x = nnx.relu(self.dense1(x))
        x = nnx.relu(self.dense2(x))
        return self.dense3(x)


class EmnistLogistic(nnx.Module):
    """Multinomial logistic regression on the flattened image."""

    def __init__(self, num_classes: int = 62, *, rngs: nnx.Rngs):
        self.dense = nnx.Linear(28 * 28, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.dense(jnp.reshape(x, (x.shape[0], -1)))


_KINDS = {"cnn": EmnistCNN, "dense": EmnistDense, "logistic": EmnistLogistic}


def emnist_model(kind: str = "cnn", num_classes: int = 62, *, seed: int = 0, rngs: nnx.Rngs | None = None,
                 **kwargs) -> Model:
    """An EMNIST model (``kind`` in cnn, dense, logistic) as a fedtrain ``Model``.

    Loss: softmax cross-entropy; metric: accuracy. ``kwargs`` go to the module.
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown EMNIST model {kind!r}; choose from {sorted(_KINDS)}.")
    module = _KINDS[kind](num_classes, **kwargs, rngs=rngs if rngs is not None else nnx.Rngs(seed))
    return from_nnx(module, loss=metrics_lib.sparse_categorical_crossentropy(),
                    metrics=[metrics_lib.accuracy()], input_key="x")
