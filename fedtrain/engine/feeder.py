"""Samples and prepares rounds on a background thread, one round ahead of the compiled round."""

from __future__ import annotations

import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from fedtrain.data.federated_data import FederatedData
from fedtrain.engine import Engine, Population
from fedtrain.engine.plan import BatchSpec, RoundInput
from fedtrain.samplers import max_cohort


def population_of(data: FederatedData, spec: BatchSpec) -> Population:
    """The clients of ``data`` that can be sampled (empty ones are left out, with a warning)."""
    ids = list(data.client_ids)
    if not ids:
        raise ValueError("the training data has no clients.")
    sizes_fn = getattr(data, "client_sizes", None)
    sizes = np.asarray(sizes_fn() if sizes_fn else [data.client_size(c) for c in ids], np.int64)
    empty = np.flatnonzero(sizes == 0)
    if empty.size:
        if empty.size == len(ids):
            raise ValueError("every client of the training data has zero examples.")
        warnings.warn(f"{empty.size} of {len(ids)} clients have no examples and are never sampled "
                      f"(e.g. {[ids[i] for i in empty[:3]]}).", UserWarning, stacklevel=4)
        keep = np.flatnonzero(sizes > 0)
        ids, sizes = [ids[i] for i in keep], sizes[keep]
    return Population(ids, sizes, spec.steps(sizes))


def sample_cohort(sampler: Any, seed: int, round_index: int, population: Population, k: int) -> tuple[np.ndarray, int]:
    """``(population indices, cohort bound)`` of a round."""
    if hasattr(sampler, "bind"):
        sampler.bind(population.ids, population.sizes)
    bound = max_cohort(sampler, population.size, k)
    idx = np.asarray(sampler.sample(seed, round_index, population.size, k), np.int64).reshape(-1)
    if idx.size > bound:
        raise ValueError(f"round {round_index + 1}: sampler {sampler!r} returned {idx.size} clients, more than its "
                         f"max_cohort {bound}.")
    return idx, bound


class RoundFeeder:
    """``get(r, k)``: round ``r``'s :class:`RoundInput` for cohort size ``k``, built one round ahead.

    Every round's input is a pure function of (seed, round, cohort size, sampler), so prefetching
    changes timing only, never results.
    """

    def __init__(self, engine: Engine, sampler: Any, seed: int):
        self.engine, self.sampler, self.seed = engine, sampler, int(seed)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedtrain-feeder")
        self._pending: dict[tuple, Future] = {}

    def _build(self, r: int, k: int, sampler: Any) -> RoundInput:
        idx, bound = sample_cohort(sampler, self.seed, r, self.engine.run_spec.population, k)
        return self.engine.prepare(r, idx, bound)

    def prefetch(self, r: int, k: int, sampler: Any) -> None:
        key = (r, k, id(sampler))
        if key not in self._pending:
            self._pending[key] = self._pool.submit(self._build, r, k, sampler)

    def get(self, r: int, k: int, sampler: Any) -> RoundInput:
        self.prefetch(r, k, sampler)
        future = self._pending.pop((r, k, id(sampler)))
        for stale in [key for key in self._pending if key[0] <= r]:
            self._pending.pop(stale).cancel()
        return future.result()

    def close(self) -> None:
        for f in self._pending.values():
            f.cancel()
        self._pool.shutdown(wait=True)
