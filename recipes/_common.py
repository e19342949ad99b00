"""Shared tables and the config builder behind every recipe in this folder.

``make(task, algorithm, variant)`` returns the ``ml_collections.ConfigDict``
that :func:`fedtrain.experiment.build` turns into a run. Variants:

- ``paper``: the task protocol and best hyperparameters of Reddi et al.,
  "Adaptive Federated Optimization" (ICLR 2021, arXiv 2003.00295), Table 1 and
  the grid-search optimum of google-research/federated
  ``optimization/docs/hyperparameters.md``.
- ``fedjax``: FedJAX's tuned ``experiments/fed_avg/*.flags`` (where defined).
- ``offline``: EMNIST only; the offline EMNIST-shaped task (real MNIST digits,
  600 writer-like clients, Dirichlet(1) label skew, 10 classes).
- ``official``: Shakespeare only; TFF's 715-client split (download).
- ``demo``: the paper settings for 60 rounds on data available offline
  (synthetic for Stack Overflow and CIFAR-100: a pipeline check, not a result).
- ``tiny``: 2 rounds on a few clients with a small model (used by the tests).
"""

from __future__ import annotations

import ml_collections

VARIANTS = ("paper", "fedjax", "offline", "official", "demo", "tiny")

# Task protocol of Reddi et al. (Table 1 / Appendix): clients per round, batch, rounds, model, data.
PROTOCOL = {
    "emnist": dict(clients_per_round=10, batch_size=20, rounds=1500, model=dict(kind="cnn", num_classes=62),
                   data=dict(source="fedjax"), metric="accuracy"),
    "shakespeare": dict(clients_per_round=10, batch_size=4, rounds=1200,
                        model=dict(embed_size=8, hidden_size=256, num_layers=2), data=dict(source="offline"),
                        metric="accuracy"),
    # <= 1000 examples per client at batch 16: at most 63 local steps; 10k validation examples.
    "stackoverflow": dict(clients_per_round=50, batch_size=16, rounds=1500, local_steps=63,
                          model=dict(vocab_size=10_000, embed_size=96, hidden_size=670),
                          data=dict(source="fedjax", vocab_size=10_000), metric="accuracy_in_vocab"),
    "cifar100": dict(clients_per_round=10, batch_size=20, rounds=4000, model=dict(kind="resnet18", crop=24),
                     data=dict(source="tff"), metric="accuracy"),
}

# log10 of the best client / server learning rates and adaptivity eps (Reddi et al., hyperparameters.md).
REDDI_LOG10 = {
    #               client lr                server lr                eps
    "cifar100": {"fedadagrad": (-1, -1, -2), "fedadam": (-1.5, 0, -1), "fedyogi": (-1.5, 0, -1),
                 "fedavgm": (-1.5, 0, None), "fedavg": (-1, 0.5, None)},
    "emnist": {"fedadagrad": (-1.5, -1, -2), "fedadam": (-1.5, -2.5, -4), "fedyogi": (-1.5, -2.5, -4),
               "fedavgm": (-1.5, -0.5, None), "fedavg": (-1, 0, None)},
    "shakespeare": {"fedadagrad": (0, -0.5, -1), "fedadam": (0, -2, -3), "fedyogi": (0, -2, -3),
                    "fedavgm": (0, -0.5, None), "fedavg": (0, 0, None)},
    "stackoverflow": {"fedadagrad": (-0.5, -1.5, -4), "fedadam": (-0.5, -2, -5), "fedyogi": (-0.5, -2, -5),
                      "fedavgm": (-0.5, 0, None), "fedavg": (-0.5, 0, None)},
}

# Reported accuracy (last-100-round average). FedAvg values and CIFAR-100 Adagrad/Adam/Yogi are checked
# against secondary sources; the others are recalled from the paper (+-1 point).
REDDI_ACCURACY = {
    "emnist": {"fedavg": 0.849, "fedavgm": 0.852, "fedadagrad": 0.851, "fedadam": 0.856, "fedyogi": 0.855},
    "shakespeare": {"fedavg": 0.569, "fedavgm": 0.573, "fedadagrad": 0.575, "fedadam": 0.570, "fedyogi": 0.572},
    "stackoverflow": {"fedavg": 0.195, "fedavgm": 0.238, "fedadagrad": 0.238, "fedadam": 0.252, "fedyogi": 0.252},
    "cifar100": {"fedavg": 0.447, "fedavgm": 0.524, "fedadagrad": 0.479, "fedadam": 0.525, "fedyogi": 0.524},
}

# FedJAX experiments/fed_avg/*.flags: (algorithm, settings).
FEDJAX_FLAGS = {
    ("emnist", "fedadam"): dict(client_learning_rate=0.001, server_learning_rate=1.0, server_b2=0.99,
                                server_eps=0.01, batch_size=10, rounds=1500, clients_per_round=10),
    ("emnist", "fedadagrad"): dict(client_learning_rate=0.316, server_learning_rate=1.0, server_eps=1e-7,
                                   batch_size=10, model=dict(kind="logistic", num_classes=62)),
    ("shakespeare", "fedavg"): dict(client_learning_rate=0.0316, server_learning_rate=1.0, batch_size=10,
                                    rounds=1500, clients_per_round=10),
    ("stackoverflow", "fedadam"): dict(client_learning_rate=0.5, server_learning_rate=0.02, server_eps=1e-8,
                                       batch_size=16, rounds=1500, clients_per_round=50, local_steps=500),
    ("cifar100", "fedyogi"): dict(client_learning_rate=0.01, server_learning_rate=0.1, server_eps=0.01,
                                  batch_size=20, rounds=4000, clients_per_round=10,
                                  model=dict(kind="logistic", crop=24)),
}

TINY = {
    "emnist": dict(model=dict(kind="logistic", num_classes=62), data=dict(source="synthetic")),
    "shakespeare": dict(model=dict(embed_size=8, hidden_size=16, num_layers=1), data=dict(source="offline")),
    "stackoverflow": dict(model=dict(vocab_size=100, embed_size=8, hidden_size=16),
                          data=dict(source="synthetic", vocab_size=100)),
    "cifar100": dict(model=dict(kind="resnet18", crop=24, width=4, blocks=(1,), stage_strides=(1,)),
                     data=dict(source="synthetic")),
}
OFFLINE_EMNIST = dict(source="mnist", num_clients=600, partition="dirichlet", alpha=1.0)


def _update(config: ml_collections.ConfigDict, values: dict) -> None:
    for key, value in values.items():
        if isinstance(value, dict):
            if key not in config or config[key] is None:
                config[key] = ml_collections.ConfigDict()
            _update(config[key], value)
        else:
            config[key] = value


def make(task: str, algorithm: str, variant: str = "paper", *, hyper_from: str | None = None,
         expected_accuracy: float | None = None, paper: str = "", extra: dict | None = None,
         variants: tuple[str, ...] = ("paper", "demo", "tiny")) -> ml_collections.ConfigDict:
    """The config of ``task`` x ``algorithm`` in ``variant``.

    ``hyper_from`` picks the Reddi et al. column for the learning rates (default
    ``algorithm``); ``extra`` adds algorithm settings; ``variants`` are the ones
    this recipe accepts.
    """
    if variant not in variants:
        raise ValueError(f"unknown variant {variant!r}; this recipe has {', '.join(variants)}.")
    proto = PROTOCOL[task]
    client, server, eps = REDDI_LOG10[task][hyper_from or algorithm]
    config = ml_collections.ConfigDict()
    config.task = task
    config.algorithm = algorithm
    config.seed = 0
    config.model = ml_collections.ConfigDict(proto["model"])
    config.client_learning_rate = float(10.0 ** client)
    config.server_learning_rate = float(10.0 ** server)
    config.rounds = proto["rounds"]
    config.clients_per_round = proto["clients_per_round"]
    config.batch_size = proto["batch_size"]
    config.local_epochs = 1
    config.local_steps = proto.get("local_steps")
    config.validation_freq = 100
    if expected_accuracy is None:
        expected_accuracy = REDDI_ACCURACY[task].get(algorithm)
    config.expected_accuracy = expected_accuracy
    config.metric = proto["metric"]
    config.paper = paper or "Reddi et al., Adaptive Federated Optimization, ICLR 2021, Table 1"
    config.data = ml_collections.ConfigDict(dict(proto["data"], max_train_clients=None, max_test_clients=None))
    config.client_momentum = 0.0
    if algorithm == "fedavgm":
        config.server_momentum = 0.9
    if eps is not None:
        config.server_b1 = 0.9
        config.server_b2 = 0.999
        config.server_eps = float(10.0 ** eps)
        config.server_initial_accumulator_value = 0.0
    if task == "stackoverflow":
        config.data.max_test_clients = 1000  # about 10k validation sequences
    config.backend = "auto"
    config.checkpoint_every = 10
    _update(config, extra or {})
    if variant == "fedjax":
        _update(config, FEDJAX_FLAGS[(task, algorithm)])
        config.expected_accuracy = None
        config.paper = "FedJAX experiments/fed_avg/*.flags (tuned by FedJAX)"
    elif variant == "offline":
        config.data = ml_collections.ConfigDict(dict(OFFLINE_EMNIST, max_train_clients=None, max_test_clients=None))
        config.model.num_classes = 10
        config.expected_accuracy = None
    elif variant == "official":
        config.data.source = "fedjax"
    elif variant == "demo":
        config.rounds = 60
        config.validation_freq = 60
        if task == "emnist":
            config.data = ml_collections.ConfigDict(dict(OFFLINE_EMNIST, max_train_clients=None,
                                                         max_test_clients=100))
            config.model.num_classes = 10
            config.expected_accuracy = None
        elif task in ("stackoverflow", "cifar100"):
            config.data.source = "synthetic"
            config.expected_accuracy = None
    elif variant == "tiny":
        _update(config, TINY[task])
        config.rounds = 2
        config.clients_per_round = 2
        config.validation_freq = 2
        config.local_steps = 2
        config.data.max_train_clients = 4
        config.data.max_test_clients = 2
        config.checkpoint_every = 1
        config.expected_accuracy = None
    return config
