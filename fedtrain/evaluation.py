"""Centralized evaluation: every example of every client, in fixed-size batches (one compile).

For algorithms with several models (e.g. HypCluster) :meth:`Evaluator.evaluate_best_of` gives each
client the model with the lowest loss on its selection data, then evaluates every client on its model.
Per-client results come as totals ``{client_id: {metric: (sum, count)}}``:
:meth:`Evaluator.client_totals` (one shared model), :meth:`Evaluator.personal_totals` (each client on
its personal model, lanes of clients side by side) and :meth:`Evaluator.best_of_client_totals`;
:func:`summarize_clients` turns them into the distribution over clients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedtrain.algorithms._common import example_losses
from fedtrain.data.federated_data import FederatedData
from fedtrain.engine.plan import feature_specs
from fedtrain.models.adapter import MASK_KEY, Model, metric_sums

DEFAULT_BATCH_SIZE = 128
DEFAULT_LANES = 8

Totals = dict[str, dict[str, tuple[float, float]]]


def example_sums(model: Model, params, batch: dict) -> dict[str, tuple[jax.Array, jax.Array]]:
    """``{name: (sums [B], weights [B])}`` for the loss and every metric: each example's weighted values
    and weight, summed over the non-batch axes (e.g. sequence positions), padding (``MASK_KEY``) at 0."""
    logits = model.apply(params, batch[model.input_key], None, False)
    mask = batch[MASK_KEY]
    out = {}
    for metric in (model.loss, *model.metrics):
        values, weights = metric.fn(batch, logits)
        weights = weights * jnp.reshape(mask, mask.shape + (1,) * (weights.ndim - 1)).astype(weights.dtype)
        axes = tuple(range(1, weights.ndim))
        out[metric.name] = (jnp.sum(values * weights, axis=axes), jnp.sum(weights, axis=axes))
    return out


def lane_sums(model: Model, params, batch: dict) -> dict[str, tuple[jax.Array, jax.Array]]:
    """``{name: (sum, count)}`` of one client's batch (:func:`example_sums` summed over the batch)."""
    return {k: (jnp.sum(s), jnp.sum(w)) for k, (s, w) in example_sums(model, params, batch).items()}


def _client_arrays(examples: dict, specs: dict, batch_size: int, steps: int) -> dict[str, np.ndarray]:
    """One client's examples as ``[steps, batch_size, ...]`` arrays with ``MASK_KEY``, zero padded."""
    n = next(iter(examples.values())).shape[0] if examples else 0
    out = {}
    for k, spec in specs.items():
        if k not in examples:
            raise ValueError(f"a client lacks feature {k!r} that other clients have.")
        buf = np.zeros((steps * batch_size,) + spec.shape, spec.dtype)
        buf[:n] = examples[k]
        out[k] = buf.reshape((steps, batch_size) + spec.shape)
    mask = np.zeros((steps * batch_size,), np.float32)
    mask[:n] = 1.0
    out[MASK_KEY] = mask.reshape(steps, batch_size)
    return out


def _batches(data: FederatedData, client_ids: Sequence[str], batch_size: int) -> Iterator[tuple[dict, np.ndarray]]:
    """Fixed-size batches over every example of ``client_ids`` in order, with ``MASK_KEY`` set, and the
    position in ``client_ids`` of each example's client (-1 for padding). Each batch is a new buffer
    (a jitted step may read the numpy memory asynchronously)."""
    buffer: dict[str, np.ndarray] | None = None
    owners = np.full((batch_size,), -1, np.int64)
    fill = 0

    def emit():
        batch = dict(buffer)
        batch[MASK_KEY] = (owners >= 0).astype(np.float32)
        return batch, owners.copy()

    for pos, cid in enumerate(client_ids):
        examples = data.get_client(cid)
        if buffer is None:
            specs = feature_specs(examples)
            buffer = {k: np.zeros((batch_size,) + s.shape, s.dtype) for k, s in specs.items()}
        n = next(iter(examples.values())).shape[0] if examples else 0
        start = 0
        while start < n:
            take = min(batch_size - fill, n - start)
            for k in buffer:
                if k not in examples:
                    raise ValueError(f"client {cid!r} lacks feature {k!r} that other clients have.")
                buffer[k][fill:fill + take] = examples[k][start:start + take]
            owners[fill:fill + take] = pos
            fill += take
            start += take
            if fill == batch_size:
                yield emit()
                buffer = {k: np.zeros_like(v) for k, v in buffer.items()}
                owners[:] = -1
                fill = 0
    if fill:
        yield emit()


LOWER_IS_BETTER = ("loss", "error", "mse", "mae", "perplexity")


def higher_is_better(metric: str) -> bool:
    """False for losses and errors (a name containing one of :data:`LOWER_IS_BETTER`), True otherwise."""
    return not any(word in metric.lower() for word in LOWER_IS_BETTER)


def summarize_clients(totals: dict[str, dict[str, tuple[float, float]]]) -> dict[str, float]:
    """The distribution over clients of every metric, from per-client ``{cid: {metric: (sum, count)}}``.

    For each metric ``m``: ``m`` (pooled over examples: ``sum / count`` over all clients, as a plain
    evaluation), ``m_client_mean`` (each client counts once), ``m_p10``, ``m_p50``, ``m_p90`` (percentiles
    over clients, linear interpolation) and ``m_worst10`` (mean over the worst tenth of clients, at least
    one: the lowest values, or the highest for losses and errors, see :func:`higher_is_better`). A client
    with no weight for a metric (count 0) is left out of that metric's distribution. Also ``num_clients``.
    """
    logs: dict[str, float] = {"num_clients": float(len(totals))}
    names = sorted({m for per in totals.values() for m in per})
    for m in names:
        pairs = np.array([per[m] for per in totals.values() if m in per], np.float64).reshape(-1, 2)
        pairs = pairs[pairs[:, 1] > 0]
        if not len(pairs):
            continue
        values = pairs[:, 0] / pairs[:, 1]
        ordered = np.sort(values) if higher_is_better(m) else -np.sort(-values)
        worst = ordered[:max(1, int(np.ceil(0.1 * len(values))))]
        logs.update({m: float(pairs[:, 0].sum() / pairs[:, 1].sum()), f"{m}_client_mean": float(values.mean()),
                     f"{m}_p10": float(np.percentile(values, 10)), f"{m}_p50": float(np.percentile(values, 50)),
                     f"{m}_p90": float(np.percentile(values, 90)), f"{m}_worst10": float(worst.mean())})
    return logs


def model_shares(choice: dict[str, int], num_models: int) -> dict[str, float]:
    """``model_share_j``: the fraction of clients in ``choice`` (``{cid: j}``) that use model ``j``."""
    return {f"model_share_{j}": sum(m == j for m in choice.values()) / max(len(choice), 1)
            for j in range(num_models)}


class Evaluator:
    """Sums loss and metrics over a dataset with one jitted step of fixed batch size."""

    def __init__(self, model: Model):
        self.model = model
        self.metric_names = (model.loss.name, *(m.name for m in model.metrics))
        self._step = jax.jit(self._sums)
        self._apply = jax.jit(lambda p, x: model.apply(p, x, None, False))
        self._model_losses = jax.jit(jax.vmap(lambda p, b: example_losses(model, p, b)[:2], in_axes=(0, None)))
        self._example_step = jax.jit(lambda p, b: self._stacked(example_sums(model, p, b)))  # [M, 2, B]
        self._lane_step = jax.jit(jax.vmap(lambda p, b: self._stacked(lane_sums(model, p, b))))  # [L, M, 2]
        self._personal_fns: dict[Callable, Callable] = {}

    def _stacked(self, sums) -> jax.Array:
        return jnp.stack([jnp.stack(sums[name]) for name in self.metric_names])

    def _as_totals(self, ids: Sequence[str], acc: np.ndarray) -> Totals:
        """``acc`` ``[clients, metrics, 2]`` as ``{cid: {metric: (sum, count)}}``; clients with no weight for
        any metric (no examples) are left out."""
        out = {}
        for cid, rows in zip(ids, acc):
            if (rows[:, 1] > 0).any():
                out[cid] = {name: (float(r[0]), float(r[1])) for name, r in zip(self.metric_names, rows)}
        return out

    def _sums(self, params, batch):
        logits = self.model.apply(params, batch[self.model.input_key], None, False)
        return metric_sums(self.model, batch, logits)

    def _totals(self, params, data: FederatedData, client_ids: Sequence[str], batch_size: int,
                progress: Callable[[int], None] | None = None):
        totals = None
        for batch, _ in _batches(data, client_ids, batch_size):
            sums = self._step(params, batch)
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
            if progress is not None:
                progress(int(batch[MASK_KEY].sum()))
        return None if totals is None else jax.device_get(totals)

    @staticmethod
    def _means(totals) -> dict[str, float]:
        if totals is None:
            raise ValueError("the evaluation data has no examples.")
        return {name: float(s) / float(c) if float(c) > 0 else float("nan") for name, (s, c) in totals.items()}

    def evaluate(self, params, data: FederatedData, *, batch_size: int | None = None,
                 progress: Callable[[int], None] | None = None) -> dict[str, float]:
        """Means over every example; ``progress(n)`` is called after each batch of ``n`` real examples."""
        return self._means(self._totals(params, data, list(data.client_ids), int(batch_size or DEFAULT_BATCH_SIZE),
                                        progress))

    def client_totals(self, params, data: FederatedData, client_ids: Sequence[str] | None = None, *,
                      batch_size: int | None = None, progress: Callable[[int], None] | None = None) -> Totals:
        """``{client_id: {metric: (sum, count)}}`` of every client of ``client_ids`` (default: all of
        ``data``) with examples, on the shared model ``params``: the dense batches of :meth:`evaluate`,
        per-example sums added to their owners on the host (float64)."""
        ids = list(data.client_ids) if client_ids is None else list(client_ids)
        acc = np.zeros((len(ids), len(self.metric_names), 2), np.float64)
        pending: list[tuple[np.ndarray, jax.Array]] = []

        def drain():
            outs = jax.device_get([o for _, o in pending])
            owners = np.concatenate([w for w, _ in pending])
            values = np.concatenate([np.asarray(o, np.float64) for o in outs], axis=-1)  # [M, 2, n*B]
            real = owners >= 0
            np.add.at(acc, owners[real], np.moveaxis(values[:, :, real], -1, 0))
            pending.clear()

        for batch, owners in _batches(data, ids, int(batch_size or DEFAULT_BATCH_SIZE)):
            pending.append((owners, self._example_step(params, batch)))
            if progress is not None:
                progress(int(batch[MASK_KEY].sum()))
            if len(pending) >= 64:  # bounded memory; the device runs ahead meanwhile
                drain()
        if pending:
            drain()
        return self._as_totals(ids, acc)

    def personal_totals(self, personal_params: Callable, server_state, client_states: Sequence[Any],
                        data: FederatedData, client_ids: Sequence[str], *, batch_size: int | None = None,
                        lanes: int = DEFAULT_LANES, progress: Callable[[int], None] | None = None) -> Totals:
        """Totals of each client of ``client_ids`` on its own model ``personal_params(server_state, state)``
        (``client_states[i]`` belongs to ``client_ids[i]``): ``lanes`` clients at a time, their states
        stacked and both ``personal_params`` and the evaluation vmapped over the lanes, each lane fed its
        client's zero-padded batches (fixed shapes: one compile)."""
        ids = list(client_ids)
        if len(client_states) != len(ids):
            raise ValueError(f"{len(client_states)} client states for {len(ids)} clients.")
        lanes = int(lanes)
        if lanes < 1:
            raise ValueError(f"lanes must be >= 1, got {lanes}.")
        bs = int(batch_size or DEFAULT_BATCH_SIZE)
        acc = np.zeros((len(ids), len(self.metric_names), 2), np.float64)
        sizes = np.asarray([data.client_size(c) for c in ids], np.int64)
        order = [i for i in np.argsort(-sizes, kind="stable") if sizes[i] > 0]  # similar sizes share a group
        if not order:
            return {}
        specs = feature_specs(data.get_client(ids[order[0]]))
        fn = self._personal_fns.get(personal_params)
        if fn is None:
            fn = self._personal_fns[personal_params] = jax.jit(jax.vmap(personal_params, in_axes=(None, 0)))
        for g in range(0, len(order), lanes):
            group = order[g:g + lanes]
            steps = int(np.ceil(sizes[group[0]] / bs))
            per_lane = []
            for i in group:
                try:
                    per_lane.append(_client_arrays(data.get_client(ids[i]), specs, bs, steps))
                except ValueError as e:
                    raise ValueError(f"client {ids[i]!r}: {e}") from None
            empty = {k: np.zeros_like(v) for k, v in per_lane[0].items()}
            per_lane += [empty] * (lanes - len(group))
            stacked = {k: np.stack([a[k] for a in per_lane], axis=1) for k in per_lane[0]}  # [steps, L, B, ...]
            states = [client_states[i] for i in group]
            states += [states[0]] * (lanes - len(group))
            params = fn(server_state, jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *states))
            total = None
            for t in range(steps):
                out = self._lane_step(params, {k: v[t] for k, v in stacked.items()})
                total = out if total is None else total + out
                if progress is not None:
                    progress(int(stacked[MASK_KEY][t].sum()))
            acc[group] = np.asarray(jax.device_get(total), np.float64)[:len(group)]
        return self._as_totals(ids, acc)

    def best_of_client_totals(self, stacked, data: FederatedData, *, select_with: FederatedData | None = None,
                              batch_size: int | None = None,
                              progress: Callable[[int], None] | None = None) -> tuple[Totals, dict[str, int]]:
        """Per-client totals when every client of ``data`` uses the model :meth:`choose_models` picks for
        it, and that choice ``{client_id: j}``."""
        bs = int(batch_size or DEFAULT_BATCH_SIZE)
        choice = self.choose_models(stacked, data, select_with=select_with, batch_size=bs)
        totals: Totals = {}
        for j in range(jax.tree.leaves(stacked)[0].shape[0]):
            ids = [cid for cid, m in choice.items() if m == j]
            if ids:
                totals.update(self.client_totals(jax.tree.map(lambda x: x[j], stacked), data, ids, batch_size=bs,
                                                 progress=progress))
        return totals, choice

    def choose_models(self, stacked, data: FederatedData, *, select_with: FederatedData | None = None,
                      batch_size: int | None = None) -> dict[str, int]:
        """``{client_id: j}``: for every client of ``data``, the model ``j`` (index on the leading axis of
        ``stacked``) with the lowest mean loss on the client's examples in ``select_with`` (its own
        examples in ``data`` when ``select_with`` lacks it). Ties go to the lowest index."""
        bs = int(batch_size or DEFAULT_BATCH_SIZE)
        ids = list(data.client_ids)
        known = set(select_with.client_ids) if select_with is not None else set()
        k = jax.tree.leaves(stacked)[0].shape[0]
        losses = np.zeros((len(ids), k), np.float64)
        counts = np.zeros((len(ids),), np.float64)
        groups = [(select_with, [i for i, c in enumerate(ids) if c in known]),
                  (data, [i for i, c in enumerate(ids) if c not in known])]
        for source, positions in groups:
            if not positions:
                continue
            for batch, owners in _batches(source, [ids[i] for i in positions], bs):
                loss, count = jax.device_get(self._model_losses(stacked, batch))  # [k, B], [k, B]
                real = owners >= 0
                rows = np.asarray(positions)[owners[real]]
                np.add.at(losses, rows, np.asarray(loss, np.float64).T[real])
                np.add.at(counts, rows, np.asarray(count[0], np.float64)[real])
        mean = losses / np.maximum(counts, 1.0)[:, None]
        return {cid: int(np.argmin(row)) for cid, row in zip(ids, mean)}

    def evaluate_best_of(self, stacked, data: FederatedData, *, select_with: FederatedData | None = None,
                         batch_size: int | None = None,
                         progress: Callable[[int], None] | None = None) -> dict[str, float]:
        """Metrics when every client of ``data`` uses the model :meth:`choose_models` picks for it; also
        ``model_share_j``, the fraction of clients that use model ``j``."""
        bs = int(batch_size or DEFAULT_BATCH_SIZE)
        choice = self.choose_models(stacked, data, select_with=select_with, batch_size=bs)
        k = jax.tree.leaves(stacked)[0].shape[0]
        totals = None
        for j in range(k):
            ids = [cid for cid, m in choice.items() if m == j]
            if not ids:
                continue
            part = self._totals(jax.tree.map(lambda x: x[j], stacked), data, ids, bs, progress)
            if part is not None:
                totals = part if totals is None else jax.tree.map(np.add, totals, part)
        return {**self._means(totals), **model_shares(choice, k)}

    def predict(self, params, x: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
        x = np.asarray(x)
        n = x.shape[0]
        outs = []
        for start in range(0, n, batch_size):
            chunk = x[start:start + batch_size]
            real = chunk.shape[0]
            if real < batch_size:
                chunk = np.concatenate([chunk, np.zeros((batch_size - real,) + chunk.shape[1:], chunk.dtype)])
            outs.append(np.asarray(self._apply(params, chunk))[:real])
        return np.concatenate(outs) if outs else np.zeros((0,))
