"""Federated algorithms: NamedTuples of pure functions."""

from fedtrain.algorithms.agnostic_fedavg import agnostic_fedavg
from fedtrain.algorithms.base import Algorithm, ClientOut, Context, Prepass
from fedtrain.algorithms.dp_fedavg import dp_fedavg
from fedtrain.algorithms.feddyn import feddyn
from fedtrain.algorithms.fednova import fednova
from fedtrain.algorithms.fedopt import fedadagrad, fedadam, fedavg, fedavgm, fedopt, fedyogi
from fedtrain.algorithms.fedprox import fedprox
from fedtrain.algorithms.hypcluster import cluster_params, hypcluster
from fedtrain.algorithms.mime import mime, mime_lite
from fedtrain.algorithms.scaffold import scaffold

__all__ = ["Algorithm", "ClientOut", "Context", "Prepass", "agnostic_fedavg", "cluster_params", "dp_fedavg",
           "fedadagrad", "fedadam", "fedavg", "fedavgm", "feddyn", "fednova", "fedopt", "fedprox", "fedyogi",
           "hypcluster", "mime", "mime_lite", "scaffold"]
