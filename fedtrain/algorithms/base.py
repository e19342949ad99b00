"""The Algorithm contract: a NamedTuple of pure functions (optax style).

Six functions, always called with the same arguments; run facts come in ``ctx``::

    init(params) -> server_state
    broadcast(server_state, ctx) -> broadcast                    # default: server_state.params
    client_init(broadcast, client_state, prepass, ctx) -> local
    client_step(local, batch, ctx) -> (local, metric_sums)     # once per local step
    client_final(broadcast, local, ctx) -> ClientOut
    server_update(server_state, aggregate, stats, ctx) -> (server_state, metrics)

Options: ``prepass`` (a pass over each client's whole dataset before training), ``client_state_init``
(persistent per-client state), ``aggregator`` (how updates are combined; the engine keeps its state),
``params`` (the model to evaluate), ``eval_models`` (several models: each client is evaluated on its best),
``personal_params`` (the model a client with stored state is evaluated on: APFL's mixture, Ditto's
personal model, a global body with the client's own head).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedtrain.aggregators import Aggregator, weighted_mean
from fedtrain.models.adapter import MASK_KEY, Model, grad_and_metrics

PyTree = Any


class Context(NamedTuple):
    """Facts of the run and of the call, the last argument of every algorithm function.

    Static: ``model``, ``num_clients`` (population size ``N``), ``clients_per_round`` (the cohort's
    bound), ``features`` (batch feature names). Traced scalars: ``round``; for client functions
    ``position`` (in the cohort), ``num_examples``, ``num_steps`` (local steps this round) and ``step``
    (index of the current local step). ``rng`` is a fresh key per call. ``client_hparams`` holds the
    injected values of client optimizers (see :meth:`init_optimizer`). ``broadcast`` is what the
    clients receive this round, after any cohort prepass (``None`` inside ``broadcast`` itself).
    ``cohort_size`` (``server_update``) is the number of clients that trained this round.
    """

    model: Model
    num_clients: int
    clients_per_round: int
    features: tuple[str, ...] = ()
    round: jax.Array | int = 0
    rng: jax.Array | None = None
    position: jax.Array | int = 0
    num_examples: jax.Array | float = 0.0
    num_steps: jax.Array | int = 0
    step: jax.Array | int = 0
    client_hparams: dict[str, Any] = {}
    broadcast: PyTree = None
    cohort_size: jax.Array | float = 0.0

    def grad(self, params: PyTree, batch: dict) -> tuple[PyTree, dict]:
        """Gradient of the mean loss over the batch's real examples, and the metric sums (train mode)."""
        return grad_and_metrics(self.model, params, batch, self.rng)

    def example_losses(self, params: PyTree, batch: dict, train: bool = False):
        """Per-example loss sums and counts ``([B], [B])`` with padding excluded, and the logits."""
        logits = self.model.apply(params, batch[self.model.input_key], self.rng if train else None, train)
        values, weights = self.model.loss.fn(batch, logits)
        mask = batch[MASK_KEY].reshape(batch[MASK_KEY].shape + (1,) * (weights.ndim - 1))
        weights = weights * mask
        axes = tuple(range(1, weights.ndim))
        return jnp.sum(values * weights, axis=axes), jnp.sum(weights, axis=axes), logits

    def init_optimizer(self, tx, params: PyTree) -> PyTree:
        """``tx.init(params)`` with the scalar hyperparameters of every ``optax.inject_hyperparams``
        state set from ``client_hparams``: trainer schedules change them without recompiling."""
        from fedtrain.engine.hyperparams import inject

        return inject(tx.init(params), self.client_hparams)


class ClientOut(NamedTuple):
    """What a client sends back.

    ``update`` goes through the aggregator with aggregation weight ``weight`` (examples for
    ``weighted_mean``; ``mean`` counts each client once); ``client_state`` is stored for the
    client's next round; ``metrics`` are per-client logs; ``stats`` is summed over the cohort and
    given to ``server_update`` *without* the aggregator: clipping, noise, compression and robust
    means do not apply to it, so per-client values that need them belong in ``update``.
    """

    update: PyTree
    weight: jax.Array
    client_state: PyTree = None
    metrics: dict[str, jax.Array] = {}
    stats: PyTree = ()


class Prepass(NamedTuple):
    """A pass over each client's whole dataset (every example once, in batches) at the broadcast model,
    before local training, whatever ``local_steps`` and ``local_epochs`` are.

    ``step(broadcast, batch, ctx) -> sums`` is summed over the client's batches (``batch['mask']``
    marks real examples); the sum is ``client_init``'s ``prepass`` argument. With
    ``cohort(broadcast, total, ctx) -> broadcast`` the sums of the whole cohort are added first and
    every client trains from the broadcast it returns (``client_init`` then gets ``None``).
    """

    step: Callable[[PyTree, dict, Context], PyTree]
    cohort: Callable[[PyTree, PyTree, Context], PyTree] | None = None


def default_broadcast(server_state: PyTree, ctx: Context) -> PyTree:
    del ctx
    return server_state.params


def default_params(server_state: PyTree) -> PyTree:
    return server_state.params


class Algorithm(NamedTuple):
    """A federated algorithm as pure functions; the engine compiles them into one round (see the
    module docstring for the signatures)."""

    name: str
    init: Callable[[PyTree], PyTree]
    client_init: Callable[[PyTree, PyTree, PyTree, Context], PyTree]
    client_step: Callable[[PyTree, dict, Context], tuple[PyTree, dict]]
    client_final: Callable[[PyTree, PyTree, Context], ClientOut]
    server_update: Callable[[PyTree, PyTree, PyTree, Context], tuple[PyTree, dict]]
    broadcast: Callable[[PyTree, Context], PyTree] = default_broadcast
    params: Callable[[PyTree], PyTree] = default_params
    prepass: Prepass | None = None
    client_state_init: Callable[[PyTree], PyTree] | None = None
    aggregator: Aggregator = weighted_mean()
    eval_models: Callable[[PyTree], PyTree] | None = None
    hyperparams: dict[str, Any] = {}
    personal_params: Callable[[PyTree, PyTree], PyTree] | None = None


SIGNATURES = {
    "init": "init(params) -> server_state",
    "broadcast": "broadcast(server_state, ctx) -> broadcast",
    "client_init": "client_init(broadcast, client_state, prepass, ctx) -> local",
    "client_step": "client_step(local, batch, ctx) -> (local, metric_sums)",
    "client_final": "client_final(broadcast, local, ctx) -> ClientOut",
    "server_update": "server_update(server_state, aggregate, stats, ctx) -> (server_state, metrics)",
    "params": "params(server_state) -> params",
    "prepass.step": "prepass.step(broadcast, batch, ctx) -> sums",
    "prepass.cohort": "prepass.cohort(broadcast, total, ctx) -> broadcast",
    "client_state_init": "client_state_init(params) -> client_state",
    "eval_models": "eval_models(server_state) -> stacked_params",
    "personal_params": "personal_params(server_state, client_state) -> params",
}


def _arity_error(algorithm: str, field: str, fn) -> str | None:
    expected = SIGNATURES[field]
    if not callable(fn):
        return f"algorithm {algorithm!r}: {field} must be a function {expected}, got {type(fn).__name__}."
    try:
        inspect.signature(fn).bind(*range(expected.split("(")[1].split(")")[0].count(",") + 1))
    except TypeError:
        return (f"algorithm {algorithm!r}: {field} has signature {field}{inspect.signature(fn)}; "
                f"the contract is {expected}.")
    except ValueError:  # builtins without a signature: checked when called
        return None
    return None


def check_algorithm(algorithm: Algorithm) -> None:
    """Raises ``TypeError`` naming the first function whose signature does not fit the contract."""
    if not isinstance(algorithm, Algorithm):
        raise TypeError(f"algorithm must be a fedtrain.algorithms.Algorithm (e.g. "
                        f"fedtrain.algorithms.fedavg(optax.sgd(0.1))); got {type(algorithm).__name__}.")
    fields = ["init", "broadcast", "client_init", "client_step", "client_final", "server_update", "params"]
    fields += [f for f in ("client_state_init", "eval_models", "personal_params") if getattr(algorithm, f) is not None]
    if algorithm.personal_params is not None and algorithm.client_state_init is None:
        raise TypeError(f"algorithm {algorithm.name!r}: personal_params reads each client's stored state, so the "
                        "algorithm needs client_state_init too.")
    if algorithm.personal_params is not None and algorithm.eval_models is not None:
        raise TypeError(f"algorithm {algorithm.name!r}: give personal_params or eval_models, not both.")
    checks = [(f, getattr(algorithm, f)) for f in fields]
    if algorithm.prepass is not None:
        if not isinstance(algorithm.prepass, Prepass):
            raise TypeError(f"algorithm {algorithm.name!r}: prepass must be a fedtrain.algorithms.Prepass, "
                            f"got {type(algorithm.prepass).__name__}.")
        checks.append(("prepass.step", algorithm.prepass.step))
        if algorithm.prepass.cohort is not None:
            checks.append(("prepass.cohort", algorithm.prepass.cohort))
    for field, fn in checks:
        error = _arity_error(algorithm.name, field, fn)
        if error:
            raise TypeError(error)
    if not isinstance(algorithm.aggregator, Aggregator):
        raise TypeError(f"algorithm {algorithm.name!r}: aggregator must be a fedtrain.aggregators.Aggregator, "
                        f"got {type(algorithm.aggregator).__name__}.")


def check_nonnegative(**values: float) -> None:
    """Raises ``ValueError`` naming the first negative or non-finite hyperparameter."""
    for name, value in values.items():
        v = float(value)
        if not v >= 0 or v == float("inf"):
            raise ValueError(f"{name} must be a finite number >= 0, got {value}.")
