"""Optimizer hyperparameters injected with ``optax.inject_hyperparams``, read and set from the host.

Server values live in the server optimizer state, so setting one is a host-side
edit of that state. Client optimizers are created inside the compiled round; the
trainer passes their injected values along with the broadcast and writes them
into each client's fresh optimizer state, so a new value never recompiles.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def _is_injected(node) -> bool:
    return hasattr(node, "hyperparams") and hasattr(node, "inner_state") and isinstance(node.hyperparams, dict)


def _injected_nodes(tree: PyTree) -> list:
    return [x for x in jax.tree.leaves(tree, is_leaf=_is_injected) if _is_injected(x)]


def _scalar_items(node) -> dict[str, Any]:
    return {k: v for k, v in node.hyperparams.items() if np.ndim(v) == 0 and not callable(v)}


def server_values(server_state: PyTree) -> dict[str, float]:
    """Injected scalar hyperparameters found in the server state (first occurrence of each name)."""
    out: dict[str, float] = {}
    for node in _injected_nodes(server_state):
        for k, v in _scalar_items(node).items():
            out.setdefault(k, float(v))
    return out


def set_server_value(server_state: PyTree, name: str, value: float) -> PyTree:
    """The server state with every injected ``name`` set to ``value`` (same dtype, so no recompilation)."""
    found = False

    def put(node):
        nonlocal found
        if not _is_injected(node) or name not in node.hyperparams:
            return node
        found = True
        old = node.hyperparams[name]
        return node._replace(hyperparams={**node.hyperparams, name: jnp.asarray(value, jnp.asarray(old).dtype)})

    new = jax.tree.map(put, server_state, is_leaf=_is_injected)
    if not found:
        raise ValueError(
            f"the server optimizer has no injected hyperparameter {name!r} (has {sorted(server_values(server_state))}); "
            "build server_tx with optax.inject_hyperparams, e.g. optax.inject_hyperparams(optax.sgd)(learning_rate=1.0).")
    return new


def _client_owned_nodes(local: PyTree, broadcast: PyTree) -> list:
    """Injected optimizer states the client created, not the server's state passed along in the
    broadcast (Mime's clients step with the server optimizer's frozen state: its values are the server's)."""
    shared = {id(n) for n in _injected_nodes(broadcast)}
    return [n for n in _injected_nodes(local) if id(n) not in shared]


def client_hyperparams(model, algorithm, server_state) -> dict[str, np.ndarray]:
    """Initial values of the injected scalar hyperparameters of the algorithm's client optimizer."""
    try:
        client_state = (None if algorithm.client_state_init is None
                        else algorithm.client_state_init(model.init_params))
        local = jax.eval_shape(lambda s, cs, key: algorithm.client_init(model, algorithm.broadcast(s), cs, key),
                               server_state, client_state, jax.random.key(0))
        if not _injected_nodes(local):
            return {}
        # eval_shape gives shapes only; the values come from a concrete call.
        broadcast = algorithm.broadcast(server_state)
        local = algorithm.client_init(model, broadcast, client_state, jax.random.key(0))
    except Exception:  # an algorithm we cannot probe simply has no schedulable client values
        return {}
    out: dict[str, np.ndarray] = {}
    for node in _client_owned_nodes(local, broadcast):
        for k, v in _scalar_items(node).items():
            out.setdefault(k, np.asarray(v))
    return out


class WithClientHyperparams(NamedTuple):
    """The server state as the compiled round sees it: the algorithm's state and the client values."""

    state: PyTree
    client: dict[str, Any]


def with_client_hyperparams(algorithm):
    """``algorithm`` over :class:`WithClientHyperparams` states: client optimizers use the given values."""

    def init(params):
        return WithClientHyperparams(algorithm.init(params), {})

    def broadcast(s):
        return algorithm.broadcast(s.state), s.client

    def client_init(model, b, client_state, rng, *prepass):
        inner, values = b
        local = algorithm.client_init(model, inner, client_state, rng, *prepass)
        owned = {id(n) for n in _client_owned_nodes(local, inner)}

        def put(node):
            if not _is_injected(node) or id(node) not in owned:
                return node
            hp = dict(node.hyperparams)
            for k, v in values.items():
                if k in hp and np.ndim(hp[k]) == 0 and not callable(hp[k]):
                    hp[k] = jnp.asarray(v).astype(jnp.asarray(hp[k]).dtype)
            return node._replace(hyperparams=hp)

        return jax.tree.map(put, local, is_leaf=_is_injected)

    def client_final(model, b, local, num_examples):
        return algorithm.client_final(model, b[0], local, num_examples)

    def server_update(s, aggregate, *stats):
        new, metrics = algorithm.server_update(s.state, aggregate, *stats)
        return WithClientHyperparams(new, s.client), metrics

    inner_pre = algorithm.prepass
    pre = None
    if inner_pre is not None:  # the pass sees the algorithm's own broadcast
        pre = inner_pre._replace(
            init=lambda model, b: inner_pre.init(model, b[0]),
            step=lambda model, b, acc, batch: inner_pre.step(model, b[0], acc, batch),
            cohort=None if inner_pre.cohort is None else lambda b, total: (inner_pre.cohort(b[0], total), b[1]))
    bind = None if algorithm.bind is None else (lambda info: with_client_hyperparams(algorithm.bind(info)))
    return algorithm._replace(init=init, broadcast=broadcast, client_init=client_init, client_final=client_final,
                              server_update=server_update, params=lambda s: algorithm.params(s.state),
                              prepass=pre, bind=bind)
