"""fedtrain: federated learning simulation on JAX, one compiled program per round."""

from fedtrain import (aggregators, algorithms, callbacks, data, datasets, distributed, logs, metrics, models,
                      samplers)
from fedtrain._version import __version__
from fedtrain.data import FederatedData, InMemoryFederatedData
from fedtrain.engine import ClientStepError
from fedtrain.trainer import FederatedTrainer

_LAZY = ("checks", "evaluation", "experiment", "privacy")  # imported on first use (privacy loads dp_accounting)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"fedtrain.{name}")
    raise AttributeError(f"module 'fedtrain' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))

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
    "experiment",
    "logs",
    "metrics",
    "models",
    "privacy",
    "samplers",
    "__version__",
]
