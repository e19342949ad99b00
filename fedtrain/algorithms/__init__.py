"""Federated algorithms: NamedTuples of pure functions."""

from fedtrain.algorithms.base import Algorithm, ClientOut
from fedtrain.algorithms.fedopt import fedadagrad, fedadam, fedavg, fedavgm, fedopt, fedyogi

__all__ = ["Algorithm", "ClientOut", "fedadagrad", "fedadam", "fedavg", "fedavgm", "fedopt", "fedyogi"]
