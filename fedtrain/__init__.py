"""fedtrain: federated learning simulation on JAX, one compiled program per round."""

from fedtrain import aggregators, algorithms, callbacks, data, datasets, distributed, metrics, models, samplers
from fedtrain.data import FederatedData, InMemoryFederatedData
from fedtrain.engine import ClientStepError
from fedtrain.trainer import FederatedTrainer

__version__ = "0.1.0"

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
    "metrics",
    "models",
    "samplers",
    "__version__",
]
