"""Per-client state of stateful algorithms (e.g. SCAFFOLD control variates).

Rows live in host memory, keyed by client id, and are created from the
algorithm's initial state the first time a client is sampled, so memory grows
with the clients that ever took part, not with the population. Each round the
engine receives only the cohort's rows, stacked in the round's lane layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

PyTree = Any


class ClientStateStore:
    """``{client_id: state}`` with gather/scatter in a round's ``[lanes, slots, ...]`` layout."""

    def __init__(self, initial_state: PyTree):
        leaves, self._treedef = jax.tree.flatten(initial_state)
        self._initial = [np.asarray(x) for x in leaves]
        self._rows: dict[str, list[np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, client_id: str) -> bool:
        return client_id in self._rows

    def get(self, client_id: str) -> PyTree:
        """One client's state (the initial state if it never took part)."""
        return jax.tree.unflatten(self._treedef, self._rows.get(client_id, self._initial))

    def gather(self, client_ids: Sequence[str], placement: Sequence[tuple[int, int]], lanes: int,
               slots: int) -> PyTree:
        """The cohort's states as arrays ``[lanes, slots, ...]`` (empty slots hold the initial state)."""
        out = [np.broadcast_to(x, (lanes, slots) + x.shape).copy() for x in self._initial]
        for cid, (lane, s) in zip(client_ids, placement):
            row = self._rows.get(cid)
            if row is not None:
                for buf, value in zip(out, row):
                    buf[lane, s] = value
        return jax.tree.unflatten(self._treedef, out)

    def scatter(self, client_ids: Sequence[str], placement: Sequence[tuple[int, int]], states: PyTree) -> None:
        """Stores the cohort's new states (``[lanes, slots, ...]`` arrays)."""
        leaves = [np.asarray(x) for x in jax.tree.leaves(states)]
        for cid, (lane, s) in zip(client_ids, placement):
            self._rows[cid] = [np.array(x[lane, s]) for x in leaves]

    def state_dict(self) -> dict[str, list[np.ndarray]]:
        return {cid: list(row) for cid, row in self._rows.items()}

    def load_state_dict(self, rows: dict[str, list[np.ndarray]]) -> None:
        for cid, row in rows.items():
            if len(row) != len(self._initial) or any(np.shape(a) != b.shape for a, b in zip(row, self._initial)):
                raise ValueError(f"client state of {cid!r} does not match this algorithm's client state shapes.")
        self._rows = {cid: [np.asarray(x) for x in row] for cid, row in rows.items()}
