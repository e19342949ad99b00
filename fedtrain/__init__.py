"""fedtrain: federated learning simulation on JAX, one compiled program per round."""

from fedtrain import (aggregators, algorithms, callbacks, data, datasets, distributed, logs, metrics, models,
                      samplers)
from fedtrain._version import __version__
from fedtrain.data import FederatedData, InMemoryFederatedData
from fedtrain.engine import ClientStepError
from fedtrain.trainer import FederatedTrainer

__all__ = [
    "ClientStepError",
    "FederatedData",
    "FederatedTrainer",
    "InMemoryFederatedData",
    "aggregators",
    "algorithms",
    "callbacks",
    "data",
    "datasets",
    "distributed",
    "logs",
    "metrics",
    "models",
    "samplers",
    "__version__",
]
