"""CIFAR-100 models: ResNet-18 with GroupNorm (Reddi et al. 2021) and logistic regression (FedJAX).

Images are ``[B, 24, 24, 3]`` float32 (the 24x24 crops of Reddi et al.) under
the batch key ``"x"``; other sizes work too.

The ResNet follows ``create_resnet18`` of google-research/federated
(``utils/models/resnet_models.py``), the model of Reddi et al.: a pre-activation
(v2) ResNet with basic blocks [2, 2, 2, 2], a 7x7/2 stem convolution, 3x3/2 max
pooling, GroupNorm with 2 groups (``tfa.layers.GroupNormalization``'s
default, epsilon 1e-3) and bias-free convolutions. That code never passes a
stride to the stages, so every stage runs at the stem's output resolution
(``stage_strides=(1, 1, 1, 1)``); ``(1, 2, 2, 2)`` gives the usual
downsampling layout. Either way: 11,227,812 parameters for 100 classes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from fedtrain import metrics as metrics_lib
from fedtrain.models.adapter import Model, from_nnx

NUM_CLASSES = 100
CROP_SIZE = 24


def _same_padding(size: int, k: int, stride: int) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return total // 2, total - total // 2


class Conv(nnx.Module):
    """SAME-padded, bias-free 2-D convolution; ``kernel [kh, kw, C_in, C_out]``.

    ``impl="im2col"`` gathers the patches and does one matmul; ``impl="lax"``
    calls ``lax.conv_general_dilated`` (same result and parameters). On CPU,
    im2col trains ResNet-18 faster (batch 20 of 24x24: ~1.1x with the default
    strides, ~10x with ``stage_strides=(1, 2, 2, 2)``).
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: int, stride: int = 1, *,
                 impl: str = "im2col", rngs: nnx.Rngs):
        if impl not in ("lax", "im2col"):
            raise ValueError(f"unknown convolution impl {impl!r}; choose 'lax' or 'im2col'.")
        self.kernel_size, self.stride, self.impl = kernel_size, stride, impl
        shape = (kernel_size, kernel_size, in_features, out_features)
        self.kernel = nnx.Param(jax.nn.initializers.he_normal()(rngs.params(), shape))

    def __call__(self, x: jax.Array) -> jax.Array:
        k, s = self.kernel_size, self.stride
        kernel = self.kernel[...]
        pads = [_same_padding(x.shape[1], k, s), _same_padding(x.shape[2], k, s)]
        if self.impl == "lax":
            return jax.lax.conv_general_dilated(x, kernel, (s, s), pads,
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if k == 1:
            return x[:, ::s, ::s, :] @ kernel.reshape(kernel.shape[2], -1)
        x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
        out_h, out_w = (x.shape[1] - k) // s + 1, (x.shape[2] - k) // s + 1
        cols = [x[:, dy:dy + s * (out_h - 1) + 1:s, dx:dx + s * (out_w - 1) + 1:s, :]
                for dy in range(k) for dx in range(k)]
        return jnp.concatenate(cols, axis=-1) @ kernel.reshape(-1, kernel.shape[-1])


def max_pool_3x3_2(x: jax.Array) -> jax.Array:
    """3x3 max pooling, stride 2, SAME padding."""
    pads = ((0, 0), _same_padding(x.shape[1], 3, 2), _same_padding(x.shape[2], 3, 2), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), pads)


def _group_norm(features: int, groups: int, rngs: nnx.Rngs) -> nnx.GroupNorm:
    return nnx.GroupNorm(features, num_groups=groups, epsilon=1e-3, rngs=rngs)


class BasicBlock(nnx.Module):
    """Pre-activation basic block: [GN-ReLU-]Conv3x3 -> GN-ReLU-Conv3x3, plus the shortcut.

    The shortcut is a 1x1 convolution and GroupNorm when the shape changes,
    else the identity. ``first`` skips the leading GN-ReLU (the stem's follows).
    """

    def __init__(self, in_features: int, features: int, stride: int = 1, *, first: bool = False, groups: int = 2,
                 impl: str = "im2col", rngs: nnx.Rngs):
        self.norm1 = None if first else _group_norm(in_features, groups, rngs)
        self.conv1 = Conv(in_features, features, 3, stride, impl=impl, rngs=rngs)
        self.norm2 = _group_norm(features, groups, rngs)
        self.conv2 = Conv(features, features, 3, 1, impl=impl, rngs=rngs)
        if stride != 1 or in_features != features:
            self.shortcut = Conv(in_features, features, 1, stride, impl=impl, rngs=rngs)
            self.shortcut_norm = _group_norm(features, groups, rngs)
        else:
            self.shortcut = self.shortcut_norm = None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x if self.norm1 is None else nnx.relu(self.norm1(x))
        h = self.conv1(h)
        h = self.conv2(nnx.relu(self.norm2(h)))
        skip = x if self.shortcut is None else self.shortcut_norm(self.shortcut(x))
        return skip + h


class ResNet18(nnx.Module):
    """ResNet-18 (v2, GroupNorm): images ``[B, H, W, C]`` -> logits ``[B, num_classes]``."""

    def __init__(self, num_classes: int = NUM_CLASSES, in_features: int = 3, *, width: int = 64,
                 blocks: Sequence[int] = (2, 2, 2, 2), stage_strides: Sequence[int] = (1, 1, 1, 1),
                 groups: int = 2, conv_impl: str = "im2col", rngs: nnx.Rngs):
        self.stem = Conv(in_features, width, 7, 2, impl=conv_impl, rngs=rngs)
        self.stem_norm = _group_norm(width, groups, rngs)
        layers, features = [], width
        for stage, (count, stride) in enumerate(zip(blocks, stage_strides)):
            out = width * 2 ** stage
            for i in range(count):
                layers.append(BasicBlock(features, out, stride if i == 0 else 1, first=stage == 0 and i == 0,
                                         groups=groups, impl=conv_impl, rngs=rngs))
                features = out
        self.blocks = nnx.List(layers)
        self.final_norm = _group_norm(features, groups, rngs)
        self.head = nnx.Linear(features, num_classes, kernel_init=jax.nn.initializers.normal(0.01), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = max_pool_3x3_2(nnx.relu(self.stem_norm(self.stem(x))))
        for block in self.blocks:
            x = block(x)
        x = nnx.relu(self.final_norm(x))
        return self.head(jnp.mean(x, axis=(1, 2)))


class CifarLogistic(nnx.Module):
    """Multinomial logistic regression on the flattened image (FedJAX ``create_logistic_model``)."""

    def __init__(self, num_classes: int = NUM_CLASSES, image_shape: Sequence[int] = (CROP_SIZE, CROP_SIZE, 3), *,
                 rngs: nnx.Rngs):
        self.num_inputs = math.prod(image_shape)
        self.dense = nnx.Linear(self.num_inputs, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.dense(jnp.reshape(x, (x.shape[0], -1)))


_KINDS = {"resnet18": ResNet18, "logistic": CifarLogistic}


def cifar_model(kind: str = "resnet18", num_classes: int = NUM_CLASSES, *, seed: int = 0,
                rngs: nnx.Rngs | None = None, **kwargs) -> Model:
    """A CIFAR model (``kind`` in resnet18, logistic) as a fedtrain ``Model``.

    Loss: softmax cross-entropy; metric: accuracy. ``kwargs`` go to the module.
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown CIFAR model {kind!r}; choose from {sorted(_KINDS)}.")
    module = _KINDS[kind](num_classes, **kwargs, rngs=rngs if rngs is not None else nnx.Rngs(seed))
    return from_nnx(module, loss=metrics_lib.sparse_categorical_crossentropy(),
                    metrics=[metrics_lib.accuracy()], input_key="x")
