"""The Algorithm contract: a NamedTuple of pure functions (optax style)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from fedtrain.aggregators import Aggregator, weighted_mean

PyTree = Any


class ClientOut(NamedTuple):
    """What a client sends back: its update, its aggregation weight, new client state, extras."""

    update: PyTree
    weight: jax.Array
    client_state: PyTree = None
    metrics: dict[str, jax.Array] = {}


class Algorithm(NamedTuple):
    """A federated algorithm as pure functions; the engine compiles them into one round.

    - ``init(params) -> server_state``
    - ``broadcast(server_state) -> broadcast`` (what every client receives)
    - ``client_init(model, broadcast, client_state, rng) -> local``
    - ``client_step(model, local, batch) -> (local, metric_sums)`` (scanned over steps;
      ``batch['mask']`` marks real examples)
    - ``client_final(model, broadcast, local, num_examples) -> ClientOut``
    - ``server_update(server_state, aggregate) -> (server_state, server_metrics)``
    - ``params(server_state) -> params`` (the model to evaluate)
    - ``aggregator``: how ``ClientOut.update`` values are combined
    - ``client_state_init(params) -> client_state`` for stateful clients, else ``None``
    """

    name: str
    init: Callable[[PyTree], PyTree]
    broadcast: Callable[[PyTree], PyTree]
    client_init: Callable[..., PyTree]
    client_step: Callable[..., tuple[PyTree, dict]]
    client_final: Callable[..., ClientOut]
    server_update: Callable[[PyTree, PyTree], tuple[PyTree, dict]]
    params: Callable[[PyTree], PyTree]
    aggregator: Aggregator = weighted_mean()
    client_state_init: Callable[[PyTree], PyTree] | None = None
    hyperparams: dict[str, Any] = {}
