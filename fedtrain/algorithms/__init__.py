"""Federated algorithms: NamedTuples of pure functions."""

from fedtrain.algorithms.agnostic_fedavg import agnostic_fedavg
from fedtrain.algorithms.apfl import apfl
from fedtrain.algorithms.base import Algorithm, ClientOut, Context, Prepass
from fedtrain.algorithms.ditto import ditto
from fedtrain.algorithms.dp_fedavg import dp_fedavg
from fedtrain.algorithms.feddyn import feddyn
from fedtrain.algorithms.fednova import fednova
from fedtrain.algorithms.fedopt import fedadagrad, fedadam, fedavg, fedavgm, fedopt, fedyogi
from fedtrain.algorithms.fedprox import fedprox
from fedtrain.algorithms.hypcluster import cluster_params, hypcluster
from fedtrain.algorithms.mime import mime, mime_lite
from fedtrain.algorithms.partial import Partition, fedbn, fedper, fedrep, is_norm_path, partition
from fedtrain.algorithms.qffl import qffl
from fedtrain.algorithms.scaffold import scaffold

__all__ = ["Algorithm", "ClientOut", "Context", "Partition", "Prepass", "agnostic_fedavg", "apfl", "cluster_params",
           "ditto", "dp_fedavg", "fedadagrad", "fedadam", "fedavg", "fedavgm", "fedbn", "feddyn", "fednova", "fedopt",
           "fedper", "fedprox", "fedrep", "fedyogi", "hypcluster", "is_norm_path", "mime", "mime_lite", "partition",
           "qffl", "scaffold"]
