"""Turns a recipe config (an ``ml_collections.ConfigDict``) into the pieces of a run.

>>> exp = build(get_config("shakespeare_fedavg", "demo"))
>>> trainer = exp.trainer()
>>> trainer.fit(exp.train_data, **exp.fit_kwargs)

Config keys (missing optional keys take the defaults below):

- ``task``: ``emnist`` | ``shakespeare`` | ``stackoverflow`` | ``cifar100``.
- ``algorithm``: one of :data:`ALGORITHMS`.
- ``data``: ``source`` plus keyword arguments of the task's ``load_data``;
  ``max_train_clients`` / ``max_test_clients`` keep the first N clients.
  EMNIST sources ``mnist``, ``fashion_mnist`` and ``digits`` read the offline
  EMNIST-shaped task (:mod:`fedtrain.datasets.emnist_like`).
- ``model``: ``kind`` (EMNIST/CIFAR) and keyword arguments of the model.
- ``client_learning_rate``, ``client_momentum``, ``server_learning_rate``,
  ``server_momentum``, ``server_b1``, ``server_b2``, ``server_eps``,
  ``server_initial_accumulator_value``: optimizer settings.
- ``rounds``, ``clients_per_round``, ``batch_size``, ``local_epochs``,
  ``local_steps``, ``validation_freq``, ``validation_batch_size``: ``fit`` arguments.
- ``dp`` (``dp_fedavg``), ``agnostic`` (``agnostic_fedavg``), ``mime``
  (``mime``/``mime_lite``), ``feddyn`` (``alpha``): algorithm settings;
  ``fednova`` uses ``client_momentum`` as its local SGD momentum.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import ml_collections
import optax

TASKS = ("emnist", "shakespeare", "stackoverflow", "cifar100")
ALGORITHMS = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox", "scaffold", "mime", "mime_lite",
              "dp_fedavg", "agnostic_fedavg", "feddyn", "fednova")
EMNIST_LIKE_SOURCES = ("mnist", "fashion_mnist", "digits")
_LIMIT_KEYS = ("max_train_clients", "max_test_clients")


class Experiment(NamedTuple):
    """Everything a run needs; ``trainer()`` builds the :class:`fedtrain.FederatedTrainer`."""

    config: ml_collections.ConfigDict
    model: Any
    train_data: Any
    test_data: Any
    algorithm: Any
    fit_kwargs: dict
    trainer_kwargs: dict
    callbacks: list

    def trainer(self):
        """A fresh :class:`fedtrain.FederatedTrainer` for this experiment."""
        from fedtrain.trainer import FederatedTrainer

        return FederatedTrainer(self.model, self.train_data, self.algorithm, **self.trainer_kwargs)


def _get(config, key: str, default=None):
    value = config.get(key, default) if hasattr(config, "get") else default
    return default if value is None and default is not None else value


def _dict(config, key: str) -> dict:
    sub = _get(config, key)
    return dict(sub.to_dict()) if sub is not None else {}


# ---------------------------------------------------------------------- data
def load_datasets(config) -> tuple[Any, Any]:
    """``(train, test)`` federated data of ``config.task`` with ``config.data`` options."""
    task = config.task
    opts = _dict(config, "data")
    limits = {k: opts.pop(k, None) for k in _LIMIT_KEYS}
    if task == "emnist":
        source = opts.get("source", "fedjax")
        if source in EMNIST_LIKE_SOURCES:
            from fedtrain.datasets import emnist_like

            train, test = emnist_like.load_data(**opts)
        else:
            from fedtrain.datasets import emnist

            train, test = emnist.load_data(**opts)
    elif task == "shakespeare":
        from fedtrain.datasets import shakespeare

        train, test = shakespeare.load_data(**opts)
    elif task == "stackoverflow":
        from fedtrain.datasets import stackoverflow

        test_split = opts.pop("test_split", "test")
        train = stackoverflow.load_data("train", **opts)
        test = stackoverflow.load_data(test_split, **opts)
    elif task == "cifar100":
        from fedtrain.datasets import cifar100

        train, test = cifar100.load_data(**opts)
    else:
        raise ValueError(f"unknown task {task!r}; use one of {TASKS}.")
    if limits["max_train_clients"]:
        train = train.subset(list(train.client_ids)[: int(limits["max_train_clients"])])
    if limits["max_test_clients"]:
        test = test.subset(list(test.client_ids)[: int(limits["max_test_clients"])])
    return train, test


# ---------------------------------------------------------------------- model
def build_model(config):
    """The task's model (a :class:`fedtrain.models.Model`) with ``config.model`` options."""
    from fedtrain import models

    opts = _dict(config, "model")
    seed = int(_get(config, "seed", 0))
    task = config.task
    if task == "emnist":
        return models.emnist_model(opts.pop("kind", "cnn"), opts.pop("num_classes", 62), seed=seed, **opts)
    if task == "shakespeare":
        return models.shakespeare_model(seed=seed, **opts)
    if task == "stackoverflow":
        return models.stackoverflow_model(seed=seed, **opts)
    if task == "cifar100":
        return _cifar_model(seed=seed, **opts)
    raise ValueError(f"unknown task {task!r}; use one of {TASKS}.")


def _cifar_model(kind: str = "resnet18", num_classes: int = 100, crop: int = 24, *, seed: int = 0, **kwargs):
    """CIFAR model on the central ``crop`` x ``crop`` crop of uint8 images, standardized per image."""
    from flax import nnx

    from fedtrain import metrics as metrics_lib
    from fedtrain.datasets.cifar100 import center_crop_standardize
    from fedtrain.models import adapter, cifar

    class CenterCrop(nnx.Module):
        def __init__(self, inner: nnx.Module):
            self.inner = inner

        def __call__(self, x):
            return self.inner(center_crop_standardize(x, crop))

    if kind == "logistic":
        kwargs.setdefault("image_shape", (crop, crop, 3))
    inner = cifar._KINDS[kind](num_classes, **kwargs, rngs=nnx.Rngs(seed)) if kind in cifar._KINDS else None
    if inner is None:
        raise ValueError(f"unknown CIFAR model {kind!r}; choose from {sorted(cifar._KINDS)}.")
    return adapter.from_nnx(CenterCrop(inner), loss=metrics_lib.sparse_categorical_crossentropy(),
                            metrics=[metrics_lib.accuracy()], input_key="x")


# ---------------------------------------------------------------------- algorithm
def build_algorithm(config):
    """The :class:`fedtrain.algorithms.Algorithm` named by ``config.algorithm``."""
    from fedtrain import algorithms as alg

    name = config.algorithm
    client_lr = float(_get(config, "client_learning_rate", 0.1))
    momentum = float(_get(config, "client_momentum", 0.0))
    client_tx = optax.sgd(client_lr, momentum=momentum or None)
    server_lr = float(_get(config, "server_learning_rate", 1.0))
    b1, b2 = float(_get(config, "server_b1", 0.9)), float(_get(config, "server_b2", 0.999))
    eps = float(_get(config, "server_eps", 1e-3))
    acc0 = float(_get(config, "server_initial_accumulator_value", 0.0))
    if name == "fedavg":
        return alg.fedavg(client_tx, server_lr)
    if name == "fedavgm":
        return alg.fedavgm(client_tx, server_lr, float(_get(config, "server_momentum", 0.9)))
    if name == "fedadam":
        return alg.fedadam(client_tx, server_lr, b1, b2, eps)
    if name == "fedyogi":
        return alg.fedyogi(client_tx, server_lr, b1, b2, eps, acc0)
    if name == "fedadagrad":
        return alg.fedadagrad(client_tx, server_lr, eps, acc0)
    if name == "fedprox":
        return alg.fedprox(client_tx, float(_get(config, "proximal_mu", 0.01)), optax.sgd(server_lr))
    if name == "scaffold":
        return alg.scaffold(client_lr, server_lr)
    if name in ("mime", "mime_lite"):
        opts = _dict(config, "mime")
        base = optax.sgd(client_lr, momentum=float(opts.get("base_momentum", 0.9)) or None)
        if name == "mime":
            return alg.mime(base, server_lr)
        return alg.mime_lite(base, server_lr, client_delta_clip_norm=opts.get("client_delta_clip_norm"))
    if name == "feddyn":
        return alg.feddyn(client_tx, float(_dict(config, "feddyn").get("alpha", 0.01)))
    if name == "fednova":
        return alg.fednova(client_lr, server_lr, momentum=momentum)
    if name == "dp_fedavg":
        opts = _dict(config, "dp")
        return alg.dp_fedavg(client_tx, float(opts.get("noise_multiplier", 1.0)), float(opts.get("clip_norm", 1.0)),
                             float(config.clients_per_round), server_lr,
                             adaptive_clipping=bool(opts.get("adaptive_clipping", False)),
                             target_quantile=float(opts.get("target_quantile", 0.5)),
                             clip_learning_rate=float(opts.get("clip_learning_rate", 0.2)))
    if name == "agnostic_fedavg":
        opts = _dict(config, "agnostic")
        return alg.agnostic_fedavg(client_tx, list(opts.get("init_domain_weights", (0.5, 0.5))),
                                   float(opts.get("domain_learning_rate", 0.1)), optax.sgd(server_lr),
                                   domain_window_size=int(opts.get("domain_window_size", 1)))
    raise ValueError(f"unknown algorithm {name!r}; use one of {ALGORITHMS}.")


# ---------------------------------------------------------------------- all together
def fit_kwargs(config) -> dict:
    """Keyword arguments of :meth:`fedtrain.FederatedTrainer.fit` from the config."""
    return {
        "rounds": int(config.rounds),
        "clients_per_round": int(config.clients_per_round),
        "batch_size": int(config.batch_size),
        "local_epochs": _get(config, "local_epochs", 1),
        "local_steps": _get(config, "local_steps"),
        "validation_freq": int(_get(config, "validation_freq", 100)),
        "validation_batch_size": int(_get(config, "validation_batch_size", 256)),
    }


def build(config) -> Experiment:
    """Loads the data, builds model and algorithm; nothing trains yet."""
    if _get(config, "task") not in TASKS:
        raise ValueError(f"unknown task {_get(config, 'task')!r}; use one of {TASKS}.")
    if _get(config, "algorithm") not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {_get(config, 'algorithm')!r}; use one of {ALGORITHMS}.")
    algorithm = build_algorithm(config)
    model = build_model(config)
    train, test = load_datasets(config)
    callbacks = []
    if config.algorithm == "dp_fedavg":
        from fedtrain.privacy import DPAccountant

        callbacks.append(DPAccountant(delta=float(_dict(config, "dp").get("delta", 1e-5))))
    trainer_kwargs = {"seed": int(_get(config, "seed", 0)), "backend": _get(config, "backend", "auto")}
    return Experiment(config, model, train, test, algorithm, fit_kwargs(config), trainer_kwargs, callbacks)


def get_config(recipe: str, variant: str | None = None):
    """The config of a recipe by name (``"emnist_fedavg"``, a file in ``./recipes`` or fedtrain's
    ``recipes/``) or by path, from any working directory; ``variant`` as in ``fedtrain train NAME:VARIANT``."""
    from fedtrain.cli.config import recipe_config, resolve_recipe

    path, named = resolve_recipe(recipe if variant is None else f"{recipe}:{variant}")
    return recipe_config(path, named)
