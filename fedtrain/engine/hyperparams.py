"""Optimizer hyperparameters injected with ``optax.inject_hyperparams``, read and set from the host.

Server values live in the server optimizer state, so setting one is a host-side
edit of that state. Client optimizers are created inside the compiled round by
``ctx.init_optimizer``; their injected values are inputs of the round
(``ctx.client_hparams``), so a new value never recompiles.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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


def inject(opt_state: PyTree, values: dict[str, Any]) -> PyTree:
    """``opt_state`` with each injected scalar hyperparameter taken from ``values``. A name missing
    from ``values`` is added with the state's own value, so a probe with an empty dict collects
    the defaults."""

    def put(node):
        if not _is_injected(node):
            return node
        hp = dict(node.hyperparams)
        for k, v in _scalar_items(node).items():
            hp[k] = jnp.asarray(values.setdefault(k, v)).astype(jnp.asarray(v).dtype)
        return node._replace(hyperparams=hp)

    return jax.tree.map(put, opt_state, is_leaf=_is_injected)


def client_defaults(probe: Callable[[dict], Any]) -> dict[str, np.ndarray]:
    """Initial values of the injected client hyperparameters: ``probe(values)`` runs ``client_init``
    concretely with an empty ``values`` dict that :func:`inject` fills with the defaults."""
    values: dict[str, Any] = {}
    probe(values)
    return {k: np.asarray(v) for k, v in values.items()}
