"""Checks before round 1: what the user passed as data, every client's features, label ranges and
the model's initial loss. Each error names the problem and the fix."""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedtrain.data.federated_data import FederatedData, InMemoryFederatedData

_HOW = ("build one with fedtrain.InMemoryFederatedData({client_id: {'x': ..., 'y': ...}}), from centralized "
        "arrays with fedtrain.data.from_arrays(arrays, client_of_example) or a partitioner in "
        "fedtrain.data.partitioners, or open a file with fedtrain.data.open_store(path)")

# A population check reads clients until it has seen them all or spent this long; the rest are
# checked when first sampled (stores on disk with many clients).
POPULATION_CHECK_SECONDS = 20.0


def as_federated_data(data: Any, what: str = "train_data") -> FederatedData:
    """``data`` as a ``FederatedData``: a ``FederatedData`` as is, ``{client_id: {feature: array}}`` in
    memory, a path to a store file opened with ``open_store``; anything else is a clear error."""
    if isinstance(data, FederatedData):
        return data
    if isinstance(data, (str, os.PathLike)):
        from fedtrain.data.convert import open_store

        if not os.path.exists(data):
            raise FileNotFoundError(f"{what}={os.fspath(data)!r} does not exist; pass a store file "
                                    "(FedJAX/TFF SQLite, TFF HDF5, fedtrain npz) or a FederatedData.")
        return open_store(data)
    if isinstance(data, Mapping):
        if not data:
            raise ValueError(f"{what} is an empty dict; it needs at least one client.")
        values = list(data.values())
        if all(isinstance(v, Mapping) for v in values):
            return InMemoryFederatedData(data)
        if all(hasattr(v, "shape") for v in values):
            raise TypeError(f"{what} is a dict of arrays {sorted(map(str, data))}, i.e. one centralized dataset, "
                            "not a dict of clients. Split it into clients with fedtrain.data.from_arrays(arrays, "
                            "client_of_example) or a partitioner in fedtrain.data.partitioners (e.g. "
                            "dirichlet_label_partition), or pass {client_id: {'x': ..., 'y': ...}}.")
        raise TypeError(f"{what} is a dict whose values are not all dicts of arrays (one per client); {_HOW}.")
    if isinstance(data, tuple | list):
        raise TypeError(f"{what} is a {type(data).__name__} (Keras-style (x, y) arrays?); federated data is "
                        f"split into clients: {_HOW}.")
    raise TypeError(f"{what} must be a FederatedData (got {type(data).__name__}); {_HOW}.")


def check_population(data: FederatedData, ids: Sequence[str], specs: dict, *, what: str,
                     class_labels: Mapping[str, int] | None = None, first_checked: int = 1,
                     budget_s: float = POPULATION_CHECK_SECONDS) -> int:
    """Checks that every client in ``ids`` has the features ``specs`` (shapes and dtype kinds) and that
    each ``class_labels`` feature holds ids in ``[0, num_classes)``. Returns how many clients it checked;
    stops after ``budget_s`` seconds (the rest are checked when first sampled)."""
    from fedtrain.engine.plan import check_client

    start = time.perf_counter()
    checked = 0
    for position, cid in enumerate(ids):
        examples = data.get_client(cid)
        n = int(np.shape(next(iter(examples.values())))[0]) if examples else 0
        if position >= first_checked:
            check_client(cid, examples, specs, n, what=what)
        for name, classes in (class_labels or {}).items():
            _check_labels(cid, name, examples.get(name), classes, what)
        checked += 1
        if time.perf_counter() - start > budget_s:
            break
    return checked


def _check_labels(cid: str, name: str, labels, num_classes: int, what: str) -> None:
    if labels is None or np.size(labels) == 0:
        return
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise TypeError(f"{what}: client {cid!r}: feature {name!r} holds class labels for the loss/metrics but has "
                        f"dtype {labels.dtype}; labels must be integers in [0, {num_classes}).")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(f"{what}: client {cid!r}: labels {name!r} range over [{low}, {high}] but the model "
                         f"outputs {num_classes} logits, so labels must lie in [0, {num_classes - 1}]. Remap the "
                         f"labels, or give the model {high + 1} outputs.")


def check_initial_loss(loss: float, num_classes: int | None) -> None:
    """Warns when the untrained model's loss is non-finite or far above ``log(num_classes)`` (the loss of
    a uniform guess), which means the loss does not match the model's outputs."""
    if not math.isfinite(loss):
        raise ValueError(f"the untrained model's loss on the first client's examples is {loss}; check the "
                         "model's outputs and the data for NaN/inf before training.")
    if num_classes is None or num_classes < 2:
        return
    uniform = math.log(num_classes)
    if loss > 3.0 * uniform + 3.0:
        warnings.warn(
            f"the untrained model's loss is {loss:.4g}, far above log({num_classes}) = {uniform:.3g} (a uniform "
            "guess): the loss probably does not match the model, e.g. a sequence model with the default "
            "sparse_categorical_crossentropy that does not exclude PAD targets. Pass loss=/metrics= (e.g. "
            "fedtrain.metrics.sequence_crossentropy(pad_id=0)), or use the model's default_loss().",
            RuntimeWarning, stacklevel=4)
