"""The Algorithm contract: a NamedTuple of pure functions (optax style)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from fedtrain.aggregators import Aggregator, weighted_mean

PyTree = Any


class ClientOut(NamedTuple):
    """What a client sends back.

    ``update`` goes through the algorithm's aggregator with aggregation weight ``weight``;
    ``client_state`` is stored for the client's next round; ``metrics`` are per-client logs;
    ``stats`` is summed over the cohort as is (no aggregator) and given to ``server_update``.
    """

    update: PyTree
    weight: jax.Array
    client_state: PyTree = None
    metrics: dict[str, jax.Array] = {}
    stats: PyTree = ()


class Prepass(NamedTuple):
    """A pass over a client's batches with the broadcast model, before local training.

    ``init(model, broadcast) -> acc`` and ``step(model, broadcast, acc, batch) -> acc`` fold the
    client's batches (``batch['mask']`` marks real examples). Without ``cohort`` the result goes to
    that client's ``client_init`` as a fifth argument. With ``cohort(broadcast, total) -> broadcast``
    the pass runs over the whole cohort first, the results are summed, and every client trains from
    the broadcast ``cohort`` returns.
    """

    init: Callable[..., PyTree]
    step: Callable[..., PyTree]
    cohort: Callable[[PyTree, PyTree], PyTree] | None = None


class RunInfo(NamedTuple):
    """What the engine knows about a run: population size, cohort size and batch features."""

    num_clients: int | None = None
    clients_per_round: int | None = None
    features: tuple[str, ...] = ()


class Algorithm(NamedTuple):
    """A federated algorithm as pure functions; the engine compiles them into one round.

    - ``init(params) -> server_state`` (a ``server_state.aggregator`` field, when present, holds the
      aggregator's state)
    - ``broadcast(server_state) -> broadcast`` (what every client receives)
    - ``client_init(model, broadcast, client_state, rng[, prepass]) -> local``
    - ``client_step(model, local, batch) -> (local, metric_sums)`` (scanned over steps;
      ``batch['mask']`` marks real examples)
    - ``client_final(model, broadcast, local, num_examples) -> ClientOut``
    - ``server_update(server_state, aggregate[, stats]) -> (server_state, server_metrics)``;
      ``stats`` (the summed ``ClientOut.stats``) is passed only when it is not empty
    - ``params(server_state) -> params`` (the model to evaluate)
    - ``aggregator``: how ``ClientOut.update`` values are combined
    - ``client_state_init(params) -> client_state`` for stateful clients, else ``None``
    - ``prepass``: an optional :class:`Prepass`
    - ``bind(run_info) -> Algorithm``: specialises the algorithm to a run; raises ``ValueError`` for
      data it cannot train on (e.g. a missing feature)
    - ``eval_models(server_state) -> stacked``: for algorithms with several models (leading axis
      ``k``), evaluation gives each client the one with the lowest loss on its data (else ``None``:
      every client is evaluated on ``params(server_state)``)
    """

    name: str
    init: Callable[[PyTree], PyTree]
    broadcast: Callable[[PyTree], PyTree]
    client_init: Callable[..., PyTree]
    client_step: Callable[..., tuple[PyTree, dict]]
    client_final: Callable[..., ClientOut]
    server_update: Callable[..., tuple[PyTree, dict]]
    params: Callable[[PyTree], PyTree]
    aggregator: Aggregator = weighted_mean()
    client_state_init: Callable[[PyTree], PyTree] | None = None
    hyperparams: dict[str, Any] = {}
    prepass: Prepass | None = None
    bind: Callable[[RunInfo], Algorithm] | None = None
    eval_models: Callable[[PyTree], PyTree] | None = None


def aggregator_state(algorithm: Algorithm, server_state: PyTree) -> PyTree:
    """The aggregator's state: the ``aggregator`` field of the server state, looking through
    wrappers that hold the algorithm's state in a ``state`` field (``()`` for stateless aggregators)."""
    if not algorithm.aggregator.stateful:
        return ()
    if hasattr(server_state, "aggregator"):
        return server_state.aggregator
    if hasattr(server_state, "state"):
        return aggregator_state(algorithm, server_state.state)
    raise ValueError(f"aggregator {algorithm.aggregator.name!r} keeps state across rounds, but the server "
                     f"state of algorithm {algorithm.name!r} has no 'aggregator' field to hold it.")


def with_aggregator_state(algorithm: Algorithm, server_state: PyTree, state: PyTree) -> PyTree:
    """``server_state`` with the aggregator's new state stored where :func:`aggregator_state` found it."""
    if not algorithm.aggregator.stateful:
        return server_state
    if hasattr(server_state, "aggregator"):
        return server_state._replace(aggregator=state)
    return server_state._replace(state=with_aggregator_state(algorithm, server_state.state, state))


def bound(algorithm: Algorithm, info: RunInfo) -> Algorithm:
    """``algorithm.bind(info)`` when the algorithm has one, else the algorithm itself."""
    return algorithm if algorithm.bind is None else algorithm.bind(info)


def check_nonnegative(**values: float) -> None:
    """Raises ``ValueError`` naming the first negative or non-finite hyperparameter."""
    for name, value in values.items():
        v = float(value)
        if not v >= 0 or v == float("inf"):
            raise ValueError(f"{name} must be a finite number >= 0, got {value}.")
