"""Federated datasets: the protocol, stores, batching."""

from fedtrain.data.federated_data import (
    ClientId,
    Examples,
    FederatedData,
    InMemoryFederatedData,
    UnknownClientError,
    from_arrays,
    num_examples_of,
)

__all__ = [
    "ClientId",
    "Examples",
    "FederatedData",
    "InMemoryFederatedData",
    "UnknownClientError",
    "from_arrays",
    "num_examples_of",
]
