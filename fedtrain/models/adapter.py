"""Turns a flax nnx module into pure functions the compiled round can use."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from fedtrain import metrics as metrics_lib

Params = Any
MetricSums = dict[str, tuple[jax.Array, jax.Array]]

MASK_KEY = "mask"


class Model(NamedTuple):
    """A model as pure functions.

    ``apply(params, x, rng, train) -> logits``; ``loss`` and ``metrics`` are
    :class:`fedtrain.metrics.Metric`; ``input_key`` names the batch feature fed
    to the model.
    """

    init_params: Params
    apply: Callable[[Params, jax.Array, jax.Array | None, bool], jax.Array]
    loss: metrics_lib.Metric
    metrics: tuple[metrics_lib.Metric, ...]
    input_key: str = "x"
    name: str = "model"


def from_nnx(
    module: nnx.Module,
    *,
    loss: Any = None,
    metrics: Sequence[Any] | None = None,
    input_key: str = "x",
) -> Model:
    """Splits ``module`` into ``nnx.Param`` state (trained) and the rest (kept fixed).

    Without ``loss``/``metrics`` the module's own ``default_loss()`` / ``default_metrics()`` are used
    when it defines them (the zoo's sequence models do), else softmax cross-entropy and accuracy.
    With a ``loss`` but no ``metrics``: accuracy when the loss has integer class labels, else none.

    Every rng stream of the module (e.g. ``dropout``) is reseeded per step from
    the engine's rng; ``train`` switches the module with ``module.train()`` /
    ``module.eval()``.
    """
    if not isinstance(module, nnx.Module):
        raise TypeError(f"expected a flax.nnx.Module, got {type(module).__name__}.")
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    # New containers for the same arrays: the split state shares its Variables with ``module``, which
    # the trainer writes the trained weights into (``update_module``); ``init_params`` must not follow.
    params, rest = jax.tree.map(lambda x: x, params), jax.tree.map(lambda x: x, rest)
    if not jax.tree.leaves(params):
        raise ValueError(f"{type(module).__name__} has no nnx.Param to train.")
    variables = jax.tree.leaves(rest, is_leaf=lambda v: isinstance(v, nnx.Variable))
    # Every rng stream (``dropout``, ``default``, ...) is reseeded per step, so no mask repeats.
    streams = sorted({v.tag for v in variables if isinstance(v, nnx.RngKey)})

    def apply(params_, x, rng=None, train=False):
        # Fresh copies of the fixed state so nnx may mutate rng counters inside any trace.
        model = nnx.merge(graphdef, params_, jax.tree.map(jnp.asarray, rest))
        if train:
            if rng is not None and streams:
                nnx.reseed(model, **{s: jax.random.fold_in(rng, i) for i, s in enumerate(streams)})
            model.train()
        else:
            model.eval()
        return model(x)

    own_loss = loss is None
    if loss is None:
        loss = module.default_loss() if hasattr(module, "default_loss") else "sparse_categorical_crossentropy"
    loss_metric = metrics_lib.get(loss)
    if metrics is None:  # accuracy by default only next to a classification loss (not e.g. after "mse")
        if hasattr(module, "default_metrics") and own_loss:
            metrics = module.default_metrics()
        else:
            metrics = ["accuracy"] if loss_metric.class_labels else []
    if loss_metric.name != "loss":
        loss_metric = loss_metric._replace(name="loss")
    metric_list = tuple(metrics_lib.get(m) for m in metrics)
    names = [m.name for m in metric_list]
    if "loss" in names or len(set(names)) != len(names):
        raise ValueError(f"metric names must be unique and not 'loss'; got {names}.")
    return Model(params, apply, loss_metric, metric_list, input_key, type(module).__name__)


def _broadcast_mask(mask: jax.Array, like: jax.Array) -> jax.Array:
    return jnp.reshape(mask, mask.shape + (1,) * (like.ndim - mask.ndim)).astype(jnp.float32)


def metric_sums(model: Model, batch: dict, logits: jax.Array) -> MetricSums:
    """``{name: (sum, count)}`` for the loss and every metric, padded examples excluded."""
    mask = batch.get(MASK_KEY)
    out = {}
    for metric in (model.loss, *model.metrics):
        values, weights = metric.fn(batch, logits)
        if mask is not None:
            weights = weights * _broadcast_mask(mask, weights)
        out[metric.name] = (jnp.sum(values * weights), jnp.sum(weights))
    return out


def loss_and_metrics(model: Model, params: Params, batch: dict, rng=None, train: bool = True):
    """Mean loss over the batch's real examples (the objective) and the metric sums."""
    logits = model.apply(params, batch[model.input_key], rng, train)
    sums = metric_sums(model, batch, logits)
    loss_sum, count = sums["loss"]
    return loss_sum / jnp.maximum(count, 1.0), sums


def grad_and_metrics(model: Model, params: Params, batch: dict, rng=None):
    """Gradient of the mean loss and the metric sums, in train mode."""
    grad_fn = jax.grad(lambda p: loss_and_metrics(model, p, batch, rng, True), has_aux=True)
    return grad_fn(params)
