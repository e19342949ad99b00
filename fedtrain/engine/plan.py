"""Host side of a round: how a cohort's examples become fixed-shape device arrays.

Clients are *packed*: each lane holds the batches of one or more clients back
to back, with per-step flags marking where a client starts and ends. A lane is
a fixed-capacity buffer and the compiled round loops only over the steps that
are used, so shapes never change between rounds (no recompilation) and no
compute is spent on padding beyond each client's last partial batch.

- ``scan`` backend: one lane holding the whole cohort.
- ``vmap`` backend: several lanes run in parallel; clients are assigned to
  lanes longest-first to the least-loaded lane, so lanes finish together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from fedtrain.data.federated_data import Examples, FederatedData


class BatchSpec(NamedTuple):
    """Local training schedule: ``batch_size`` examples per step for ``local_epochs``
    passes over the client's data, capped at ``local_steps`` steps (if given).
    With ``local_epochs=None`` the data repeats until ``local_steps`` steps."""

    batch_size: int
    local_epochs: int | None = 1
    local_steps: int | None = None

    def validate(self) -> BatchSpec:
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}.")
        if self.local_epochs is None and self.local_steps is None:
            raise ValueError("give local_epochs, local_steps or both; with neither, clients would train forever.")
        if self.local_epochs is not None and int(self.local_epochs) < 1:
            raise ValueError(f"local_epochs must be >= 1 (or None with local_steps), got {self.local_epochs}.")
        if self.local_steps is not None and int(self.local_steps) < 1:
            raise ValueError(f"local_steps must be >= 1, got {self.local_steps}.")
        return self

    def steps(self, num_examples: np.ndarray | int) -> np.ndarray:
        """Number of local steps for clients of the given sizes (0 for empty clients)."""
        n = np.asarray(num_examples, dtype=np.int64)
        if self.local_epochs is None:
            steps = np.full_like(n, int(self.local_steps))
        else:
            steps = -(-n * int(self.local_epochs) // int(self.batch_size))
            if self.local_steps is not None:
                steps = np.minimum(steps, int(self.local_steps))
        return np.where(n > 0, steps, 0)

    def examples_seen(self, num_examples: np.ndarray | int) -> np.ndarray:
        """Real (non-padding) examples processed by a client of the given size."""
        n = np.asarray(num_examples, dtype=np.int64)
        budget = self.steps(n) * int(self.batch_size)
        if self.local_epochs is None:
            return np.where(n > 0, budget, 0)
        return np.minimum(budget, n * int(self.local_epochs))


def partial_batch_buckets(batch_size: int) -> tuple[int, ...]:
    """Batch shapes a single-lane round may run a step with: ``ceil(B / 2**k)``, k = 0..3.

    A client's last, partial batch runs with the smallest shape that holds its
    real examples (a ``switch`` on device), so padding costs at most about half
    of that batch instead of up to ``B - 1`` examples.
    """
    return tuple(sorted({-(-int(batch_size) // 2**k) for k in range(4)}))


class Layout(NamedTuple):
    """Fixed shapes of a round: ``lanes`` x ``capacity`` steps, ``slots`` clients per lane.

    ``bucketed``: lanes run one at a time on their device, so partial batches use
    :func:`partial_batch_buckets` (default: only when there is a single lane).
    """

    lanes: int
    slots: int
    capacity: int
    bucketed: bool | None = None


def make_layout(step_counts: np.ndarray, clients_per_round: int, lanes: int, *, exact_lanes: bool = False,
                bucketed: bool | None = None, worst_case: bool = False) -> Layout:
    """Fixed shapes for every cohort of ``clients_per_round`` clients of this population.

    The lane capacity is the smaller of the worst case (the ``slots`` largest clients in one
    lane) and :func:`likely_lane_load`, so memory follows the cohort, not the population's
    largest clients; ``worst_case=True`` takes the former (after a cohort did not fit).
    ``lanes`` is capped at the cohort size unless ``exact_lanes`` (sharded rounds need one
    lane per device even when some stay empty).
    """
    lanes = max(1, int(lanes) if exact_lanes else min(int(lanes), clients_per_round))
    slots = math.ceil(clients_per_round / lanes)
    steps = np.asarray(step_counts, np.int64)
    capacity = int(np.sort(steps)[::-1][:slots].sum())
    if not worst_case:
        capacity = min(capacity, likely_lane_load(steps, clients_per_round, lanes))
    return Layout(lanes, slots, max(1, capacity), bucketed)


def likely_lane_load(step_counts: np.ndarray, clients_per_round: int, lanes: int) -> int:
    """Steps of the busiest lane that a uniformly sampled cohort exceeds with negligible probability:
    the cohort total's mean plus 4 standard deviations (sampling without replacement), spread over
    the lanes, plus the largest client (heavy tails: one big client dominates a cohort's sum; and
    the longest-first imbalance between lanes)."""
    steps = np.asarray(step_counts, np.float64)
    n, k = len(steps), min(int(clients_per_round), len(step_counts))
    shrink = (n - k) / max(n - 1, 1)
    total = k * steps.mean() + 4.0 * math.sqrt(k * steps.var() * shrink)
    return int(math.ceil(total / lanes) + steps.max())


def lane_loads(cohort_steps: Sequence[int], layout: Layout) -> np.ndarray:
    """Steps each lane gets when this cohort is placed longest-first."""
    loads = np.zeros(layout.lanes, np.int64)
    for (lane, _), k in zip(assign_lanes(list(cohort_steps), layout), cohort_steps):
        loads[lane] += int(k)
    return loads


class FeatureSpec(NamedTuple):
    shape: tuple[int, ...]
    dtype: np.dtype


def feature_specs(examples: Examples) -> dict[str, FeatureSpec]:
    return {k: FeatureSpec(tuple(v.shape[1:]), _device_dtype(v.dtype)) for k, v in examples.items()}


def _device_dtype(dtype: np.dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype == np.float64:
        return np.dtype(np.float32)
    if dtype == np.int64 or dtype == np.uint64:
        return np.dtype(np.int32)
    if dtype.kind in "OSUV":
        raise TypeError(f"dtype {dtype} cannot go to the device; preprocess text into integer ids first.")
    return dtype


class RoundBatch(NamedTuple):
    """A cohort's training data in fixed shapes (numpy; the engine moves it to the device)."""

    features: dict[str, np.ndarray]  # [L, T, B, ...]
    mask: np.ndarray  # [L, T, B] float32, 1 for real examples
    slot: np.ndarray  # [L, T] int32, slot of the client this step belongs to
    first: np.ndarray  # [L, T] bool, first step of a client
    last: np.ndarray  # [L, T] bool, last step of a client
    bucket: np.ndarray  # [L, T] int32, index into partial_batch_buckets(B) (single lane) or 0
    num_steps: np.ndarray  # [L] int32, steps used in each lane
    weights: np.ndarray  # [L, S] float32, examples of the client in each slot (0 = empty)
    positions: np.ndarray  # [L, S] int32, cohort position of the client in each slot (-1 = empty)


class RoundPlan(NamedTuple):
    """A built round: device arrays' source plus host-side bookkeeping."""

    round_index: int
    client_ids: list[str]
    batch: RoundBatch
    placement: list[tuple[int, int]]  # cohort position -> (lane, slot)
    real_examples: int
    computed_examples: int

    @property
    def padding_efficiency(self) -> float:
        return self.real_examples / max(self.computed_examples, 1)


def assign_lanes(steps: Sequence[int], layout: Layout) -> list[tuple[int, int]]:
    """Longest-first assignment of clients to the least-loaded lane with a free slot."""
    placement: list[tuple[int, int]] = [(-1, -1)] * len(steps)
    load = np.zeros(layout.lanes, np.int64)
    used = np.zeros(layout.lanes, np.int64)
    for pos in sorted(range(len(steps)), key=lambda i: (-steps[i], i)):
        free = np.flatnonzero(used < layout.slots)
        lane = int(free[np.argmin(load[free])])
        placement[pos] = (lane, int(used[lane]))
        used[lane] += 1
        load[lane] += steps[pos]
    return placement


def example_order(num_examples: int, spec: BatchSpec, steps: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of the examples a client visits, one shuffled pass per epoch; -1 pads the last batch."""
    total = steps * spec.batch_size
    passes = -(-total // num_examples)
    if spec.local_epochs is not None:
        passes = min(passes, int(spec.local_epochs))
    order = np.concatenate([rng.permutation(num_examples) for _ in range(passes)])[:total]
    if order.size < total:
        order = np.concatenate([order, np.full(total - order.size, -1, order.dtype)])
    return order


def client_rng(seed: int, round_index: int, population_index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(round_index), int(population_index), 0xC1])


def build_round(
    data: FederatedData,
    client_ids: Sequence[str],
    population_indices: Sequence[int],
    sizes: Sequence[int],
    spec: BatchSpec,
    layout: Layout,
    specs: dict[str, FeatureSpec],
    seed: int,
    round_index: int,
    local_lanes: Sequence[int] | None = None,
) -> RoundPlan:
    """Reads, shuffles, batches and packs one cohort into a :class:`RoundBatch`.

    With ``local_lanes`` (multi-host), only the clients placed in those lanes are read;
    every lane's step metadata is still filled, so all processes agree on the plan.
    """
    sizes = np.asarray(sizes, np.int64)
    steps = spec.steps(sizes)
    L, S, T, B = layout.lanes, layout.slots, layout.capacity, spec.batch_size
    placement = assign_lanes(list(steps), layout)
    # np.zeros maps fresh zero pages: the unused tail of the capacity costs no memory.
    features = {k: np.zeros((L, T, B) + s.shape, s.dtype) for k, s in specs.items()}
    mask = np.zeros((L, T, B), np.float32)
    slot = np.zeros((L, T), np.int32)
    first = np.zeros((L, T), bool)
    last = np.zeros((L, T), bool)
    bucket = np.zeros((L, T), np.int32)
    bucketed = layout.bucketed if layout.bucketed is not None else L == 1
    buckets = np.asarray(partial_batch_buckets(B) if bucketed else (B,))
    reads = None if local_lanes is None else set(int(lane) for lane in local_lanes)
    num_steps = np.zeros((L,), np.int32)
    weights = np.zeros((L, S), np.float32)
    positions = np.full((L, S), -1, np.int32)
    cursor = np.zeros(L, np.int64)
    # Fill lanes in slot order so each lane's clients are contiguous in slot order.
    for pos in sorted(range(len(client_ids)), key=lambda p: placement[p]):
        lane, s = placement[pos]
        k = int(steps[pos])
        positions[lane, s] = pos
        weights[lane, s] = float(sizes[pos])
        if k == 0:
            continue
        cid = client_ids[pos]
        order = example_order(int(sizes[pos]), spec, k, client_rng(seed, round_index, population_indices[pos]))
        start = int(cursor[lane])
        stop = start + k
        if stop > T:
            raise RuntimeError(f"lane capacity {T} exceeded at client {cid!r}; sizes changed since fit() started?")
        if reads is None or lane in reads:
            examples = data.get_client(cid)
            _check_client(cid, examples, specs, int(sizes[pos]))
            take = np.maximum(order, 0)
            for name, buf in features.items():
                buf[lane, start:stop] = examples[name][take].reshape((k, B) + specs[name].shape)
        mask[lane, start:stop] = (order >= 0).reshape(k, B)
        # Padding is only ever at the end of a batch, so a step's real examples are a prefix.
        bucket[lane, start:stop] = np.searchsorted(buckets, mask[lane, start:stop].sum(axis=1))
        slot[lane, start:stop] = s
        first[lane, start] = True
        last[lane, stop - 1] = True
        cursor[lane] = stop
    num_steps[:] = cursor
    real = int(spec.examples_seen(sizes).sum())
    if bucketed:  # lanes run one after another on their device; devices wait for the busiest
        computed = L * max(int(buckets[bucket[lane, : cursor[lane]]].sum()) for lane in range(L))
    else:
        computed = int(cursor.max() * L * B)  # lanes run in lockstep until the longest is done
    batch = RoundBatch(features, mask, slot, first, last, bucket, num_steps, weights, positions)
    return RoundPlan(int(round_index), list(client_ids), batch, placement, real, computed)


def _check_client(cid: str, examples: Examples, specs: dict[str, FeatureSpec], size: int) -> None:
    missing = sorted(set(specs) - set(examples))
    if missing:
        raise ValueError(f"client {cid!r} lacks features {missing} that other clients have; "
                         "every client needs the same features.")
    for name, fs in specs.items():
        arr = examples[name]
        if tuple(arr.shape[1:]) != fs.shape or arr.shape[0] != size:
            raise ValueError(
                f"client {cid!r}: feature {name!r} has shape {tuple(arr.shape)}, expected "
                f"({size}, {', '.join(map(str, fs.shape))}) like the other clients."
            )
        if np.dtype(arr.dtype).kind != fs.dtype.kind and not (
            np.dtype(arr.dtype).kind in "iu" and fs.dtype.kind in "iu"
        ):
            raise TypeError(f"client {cid!r}: feature {name!r} has dtype {arr.dtype}, expected {fs.dtype}.")
