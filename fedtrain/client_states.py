"""Per-client state of stateful algorithms (e.g. SCAFFOLD control variates).

The state is kept in device memory when it fits and in host memory otherwise:

- **device**: one table per state leaf, ``[rows + 1, ...]`` on the device, with a row per client of
  the population (a host dict maps client ids to rows) and a last row holding the initial state,
  never written. A round gathers the cohort's rows with one compiled ``table[idx]`` and scatters
  the new ones with one compiled ``table.at[idx].set(...)`` that updates the table in place
  (buffer donation): no device-to-host copy per round. Memory is the whole population's rows.
- **host**: numpy rows keyed by client id, created the first time a client is sampled, so memory
  grows with the clients that ever took part, not with the population. Each round the engine
  receives only the cohort's rows, stacked in the round's lane layout.

``placement="auto"`` picks device when ``num_clients * bytes_per_row`` fits a budget (a quarter of
the device's memory limit, or 1 GiB where the device reports none, as on CPU); multi-process runs
always use host memory. Either way :meth:`ClientStateStore.state_dict` returns the rows of the
clients that took part, ``{client_id: [leaf arrays]}``, so checkpoints restore in either mode.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

PLACEMENTS = ("auto", "device", "host")
CPU_BUDGET_BYTES = 1 << 30  # devices that report no memory limit (CPU)


def device_memory_budget(device: jax.Device | None = None) -> int:
    """Bytes of device memory that ``placement="auto"`` lets the client-state table use: a quarter of
    the device's memory limit, or 1 GiB when the device reports none (CPU)."""
    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # some backends do not implement memory_stats
        stats = None
    limit = (stats or {}).get("bytes_limit")
    return int(limit) // 4 if limit else CPU_BUDGET_BYTES


def _gather(tables, idx):
    return [t[idx] for t in tables]


def _scatter(tables, idx, new):
    return [t.at[idx].set(n.astype(t.dtype), mode="drop") for t, n in zip(tables, new)]


def _fill(initial, rows: int):
    return [jnp.broadcast_to(x, (rows,) + x.shape) for x in initial]


_gather_jit = jax.jit(_gather)
_scatter_jit = jax.jit(_scatter, donate_argnums=0)
_fill_jit = jax.jit(_fill, static_argnums=1)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


class ClientStateStore:
    """``{client_id: state}`` with gather/scatter in a round's ``[lanes, slots, ...]`` layout.

    ``placement`` is ``"host"`` (the default here), ``"device"`` or ``"auto"`` (see the module
    docstring); ``memory_budget`` overrides the bytes ``"auto"`` and ``"device"`` may use.
    :meth:`bind` tells the store the population (the trainer calls it in ``fit``); a device table
    also grows when it meets clients outside it.
    """

    def __init__(self, initial_state: PyTree, *, placement: str = "host", memory_budget: int | None = None,
                 device: jax.Device | None = None):
        if placement not in PLACEMENTS:
            raise ValueError(f"client state placement must be one of {PLACEMENTS}, got {placement!r}.")
        leaves, self._treedef = jax.tree.flatten(initial_state)
        self._initial = [np.asarray(x) for x in leaves]
        self.requested_placement = placement
        self.memory_budget = None if memory_budget is None else int(memory_budget)
        self.bytes_per_row = int(sum(x.nbytes for x in self._initial))
        self._device = device
        # host mode
        self._rows: dict[str, list[np.ndarray]] = {}
        # device mode: tables [capacity + 1, ...] (row ``capacity`` = the initial state), client -> row,
        # and the clients that took part (insertion-ordered, like the host rows)
        self._tables: list[jax.Array] | None = None
        self._index: dict[str, int] = {}
        self._seen: dict[str, None] = {}
        self._capacity = 0
        self._mode = "host"
        self._decided = placement != "auto" or not self._initial  # a state without arrays stays on the host
        if placement == "device" and self._initial:
            self._check_single_process()
            self._to_device([])

    def initial_state(self) -> PyTree:
        """The state a client has before its first round (host arrays)."""
        return jax.tree.unflatten(self._treedef, self._initial)

    # ------------------------------------------------------------------ placement
    @property
    def placement(self) -> str:
        """Where the rows live now: ``"device"`` or ``"host"``."""
        return self._mode

    @property
    def device(self) -> jax.Device:
        return self._device or jax.local_devices()[0]

    def budget(self) -> int:
        return self.memory_budget if self.memory_budget is not None else device_memory_budget(self.device)

    def _check_single_process(self) -> None:
        if jax.process_count() > 1:
            raise ValueError("client state placement 'device' is not supported in multi-process runs "
                             f"({jax.process_count()} processes); use placement 'auto' or 'host' (host memory).")

    def _fits(self, rows: int) -> bool:
        return rows * self.bytes_per_row <= self.budget()

    def _too_big(self, rows: int) -> ValueError:
        return ValueError(
            f"the per-client state of {rows:,} clients needs {_size(rows * self.bytes_per_row)} "
            f"({_size(self.bytes_per_row)} per client) in device memory, more than the budget of "
            f"{_size(self.budget())} on {self.device}; use client_state_placement='host' (or 'auto'), "
            "or raise the budget (ClientStateStore(memory_budget=...)).")

    def bind(self, client_ids: Iterable[str]) -> None:
        """Declares the population: ``"auto"`` picks device or host memory here (once), and a device
        table gets a row for every client (growing if some are new)."""
        ids = list(client_ids)
        if not self._decided:  # "auto", first population
            self._decided = True
            rows = len(set(ids) | self._rows.keys())
            if jax.process_count() == 1 and self._fits(rows):
                self._to_device(ids)
        elif self._mode == "device":
            self._ensure(ids)

    def _to_device(self, ids: Sequence[str]) -> None:
        """Switches to device mode: a table over ``ids`` and the host rows so far (moved over)."""
        rows, self._rows = self._rows, {}
        self._mode = "device"
        self._index, self._seen, self._capacity, self._tables = {}, {}, 0, None
        self._ensure(list(ids) + list(rows))
        if rows:
            self._write(rows)

    def _to_host(self) -> None:
        rows = self.state_dict()
        self._tables, self._index, self._seen, self._capacity = None, {}, {}, 0
        self._mode, self._rows = "host", rows

    def _ensure(self, ids: Iterable[str]) -> None:
        """Device mode: gives every id a row, growing the table (at least doubling) when needed."""
        if self._mode != "device":
            return
        new = [c for c in dict.fromkeys(ids) if c not in self._index]
        if not new and self._tables is not None:
            return
        needed = len(self._index) + len(new)
        if needed > self._capacity or self._tables is None:
            if not self._fits(needed):
                if self.requested_placement == "device":
                    raise self._too_big(needed)
                self._to_host()  # "auto": the population outgrew the budget
                return
            capacity = max(needed, min(2 * self._capacity, self.budget() // max(self.bytes_per_row, 1)))
            self._grow(capacity)
        for c in new:
            self._index[c] = len(self._index)

    def _grow(self, capacity: int) -> None:
        initial = jax.device_put(self._initial, self.device)
        fresh = _fill_jit(initial, capacity - self._capacity + 1)  # new rows + the initial row
        if self._tables is None:
            self._tables = fresh
        else:
            old, self._tables = self._tables, None
            self._tables = [jnp.concatenate([t[: self._capacity], f]) for t, f in zip(old, fresh)]
            del old
        self._capacity = capacity

    def _write(self, rows: dict[str, list[np.ndarray]]) -> None:
        """Device mode: stores whole rows given on the host."""
        ids = list(rows)
        self._ensure(ids)
        if self._mode != "device":
            self._rows.update(rows)
            return
        idx = np.asarray([self._index[c] for c in ids], np.int32)
        stacked = [np.stack([np.asarray(rows[c][i]) for c in ids]) for i in range(len(self._initial))]
        self._tables = _scatter_jit(self._tables, idx, jax.device_put(stacked, self.device))
        self._seen.update(dict.fromkeys(ids))

    # ------------------------------------------------------------------ mapping
    def __len__(self) -> int:
        return len(self._seen) if self._mode == "device" else len(self._rows)

    def __contains__(self, client_id: str) -> bool:
        return client_id in (self._seen if self._mode == "device" else self._rows)

    def get(self, client_id: str) -> PyTree:
        """One client's state (the initial state if it never took part)."""
        if self._mode == "device" and client_id in self._seen:
            row = self._index[client_id]
            return jax.tree.unflatten(self._treedef, [np.asarray(t[row]) for t in self._tables])
        return jax.tree.unflatten(self._treedef, self._rows.get(client_id, self._initial))

    # ------------------------------------------------------------------ rounds
    def _indices(self, client_ids: Sequence[str], placement: Sequence[tuple[int, int]], lanes: int, slots: int,
                 empty: int) -> np.ndarray:
        idx = np.full((lanes, slots), empty, np.int32)
        for cid, (lane, s) in zip(client_ids, placement):
            idx[lane, s] = self._index[cid]
        return idx

    def gather(self, client_ids: Sequence[str], placement: Sequence[tuple[int, int]], lanes: int,
               slots: int) -> PyTree:
        """The cohort's states as arrays ``[lanes, slots, ...]`` (empty slots hold the initial state):
        numpy arrays in host mode, arrays on the table's device in device mode."""
        if self._mode == "device":
            self._ensure(client_ids)
        if self._mode == "device":
            idx = self._indices(client_ids, placement, lanes, slots, empty=self._capacity)
            return jax.tree.unflatten(self._treedef, _gather_jit(self._tables, idx))
        out = [np.broadcast_to(x, (lanes, slots) + x.shape).copy() for x in self._initial]
        for cid, (lane, s) in zip(client_ids, placement):
            row = self._rows.get(cid)
            if row is not None:
                for buf, value in zip(out, row):
                    buf[lane, s] = value
        return jax.tree.unflatten(self._treedef, out)

    def scatter(self, client_ids: Sequence[str], placement: Sequence[tuple[int, int]], states: PyTree) -> None:
        """Stores the cohort's new states (``[lanes, slots, ...]`` arrays, host or device)."""
        if self._mode == "device":
            self._ensure(client_ids)
        if self._mode == "device":
            # empty slots (and all but the last of a repeated client) get an out-of-range row: dropped
            last = {cid: i for i, cid in enumerate(client_ids)}
            keep = [i for i, cid in enumerate(client_ids) if last[cid] == i]
            idx = self._indices([client_ids[i] for i in keep], [placement[i] for i in keep],
                                *np.shape(jax.tree.leaves(states)[0])[:2], empty=self._capacity + 1)
            new = jax.device_put(jax.tree.leaves(states), self.device)
            self._tables = _scatter_jit(self._tables, idx, new)
            self._seen.update(dict.fromkeys(client_ids))
            return
        leaves = [np.asarray(x) for x in jax.device_get(jax.tree.leaves(states))]
        for cid, (lane, s) in zip(client_ids, placement):
            self._rows[cid] = [np.array(x[lane, s]) for x in leaves]

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, list[np.ndarray]]:
        """``{client_id: [leaf arrays]}`` for the clients that took part (host copies, either mode)."""
        if self._mode != "device":
            return {cid: list(row) for cid, row in self._rows.items()}
        ids = list(self._seen)
        if not ids:
            return {}
        idx = np.asarray([self._index[c] for c in ids], np.int32)
        leaves = jax.device_get(_gather_jit(self._tables, idx))
        return {cid: [x[i] for x in leaves] for i, cid in enumerate(ids)}

    def load_state_dict(self, rows: dict[str, list[np.ndarray]]) -> None:
        """Replaces every client's state with ``rows`` (clients not in it return to the initial state)."""
        for cid, row in rows.items():
            if len(row) != len(self._initial) or any(np.shape(a) != b.shape for a, b in zip(row, self._initial)):
                raise ValueError(f"client state of {cid!r} does not match this algorithm's client state shapes.")
        rows = {cid: [np.asarray(x) for x in row] for cid, row in rows.items()}
        if self._mode != "device":
            self._rows = rows
            return
        ids = list(self._index)
        self._tables, self._index, self._seen, self._capacity = None, {}, {}, 0
        self._ensure(ids + list(rows))  # the same population, reset to the initial state
        if rows:
            self._write(rows)
