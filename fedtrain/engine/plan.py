"""Host side of a round: how a cohort's examples become fixed-shape arrays.

A round has ``lanes`` lanes of ``slots`` client slots. Lanes run side by side
(``vmap``, or one per device); inside a lane, clients run one after another,
each with its own loop over its local steps. Slot ``g`` of every lane holds one
*lockstep group*: the cohort sorted by steps, ``lanes`` clients at a time, so
lanes that run in lockstep wait little for each other; within a group, the
largest client goes to the least-loaded lane. Each lane's batches are packed
back to back in a fixed-capacity buffer, so shapes never change between rounds
and no compute is spent on padding beyond each client's last partial batch.

An algorithm's prepass reads a second stream: every client's examples once, in
order, in ``ceil(n / batch_size)`` batches.
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
    """Batch shapes a single-lane round may run a last partial batch with: ``ceil(B / 2**k)``, k = 0..3.

    A client's last batch runs with the smallest chosen shape that holds its real
    examples (a ``switch`` on device). Each shape compiles the step again, so the
    engine keeps only those that save enough compute (:func:`choose_buckets`).
    """
    return tuple(sorted({-(-int(batch_size) // 2**k) for k in range(4)}))


def _bucket_cost(num_examples: np.ndarray, spec: BatchSpec, buckets: Sequence[int]) -> int:
    """Example-steps computed for clients of these sizes when last batches use ``buckets``."""
    n = np.asarray(num_examples, np.int64)
    B, steps = int(spec.batch_size), spec.steps(n)
    last = spec.examples_seen(n) - np.maximum(steps - 1, 0) * B  # real examples in the last batch
    shapes = np.asarray(sorted(set(buckets) | {B}))
    return int(np.where(steps > 0, (steps - 1) * B + shapes[np.searchsorted(shapes, last)], 0).sum())


def choose_buckets(num_examples: np.ndarray, spec: BatchSpec, min_gain: float = 0.03) -> tuple[int, ...]:
    """The partial-batch shapes worth compiling for this population: from the largest, each smaller
    shape of :func:`partial_batch_buckets` is kept when it cuts the compute by ``min_gain`` (0.03:
    3 %); ``()`` when none is (every step runs full batches)."""
    chosen = [int(spec.batch_size)]
    for shape in sorted(partial_batch_buckets(spec.batch_size), reverse=True)[1:]:
        if _bucket_cost(num_examples, spec, chosen) >= (1 + min_gain) * _bucket_cost(num_examples, spec,
                                                                                      chosen + [shape]):
            chosen.append(shape)
    return tuple(sorted(chosen)) if len(chosen) > 1 else ()


def prepass_steps(num_examples: np.ndarray | int, batch_size: int) -> np.ndarray:
    """Batches of a prepass over every example once."""
    return -(-np.asarray(num_examples, np.int64) // int(batch_size))


class Layout(NamedTuple):
    """Fixed shapes of a round: ``lanes`` lanes of ``slots`` clients, ``capacity`` training steps and
    ``prepass_capacity`` prepass batches per lane. ``bucketed``: lanes run one at a time on their
    device, so last partial batches may use the smaller shapes ``buckets`` (``()``: full batches)."""

    lanes: int
    slots: int
    capacity: int
    prepass_capacity: int = 0
    bucketed: bool = False
    buckets: tuple[int, ...] = ()


def lockstep_efficiency(steps: Sequence[int], lanes: int) -> float:
    """Real steps / steps executed when ``steps`` (one cohort) runs in lanes that wait for each other
    slot by slot (see :func:`place`)."""
    steps = np.sort(np.asarray(steps, np.int64))[::-1]
    if steps.sum() == 0:
        return 1.0
    groups = [steps[i:i + lanes] for i in range(0, len(steps), lanes)]
    return float(steps.sum() / sum(lanes * int(g.max()) for g in groups))


def choose_lanes(step_counts: np.ndarray, clients_per_round: int, max_lanes: int, target: float = 0.85,
                 samples: int = 32, seed: int = 0) -> int:
    """The most lanes (at most ``max_lanes``) whose :func:`lockstep_efficiency` reaches ``target`` in
    at least 80 % of sampled cohorts of this population: parallel lanes, little time waiting."""
    steps = np.asarray(step_counts, np.int64)
    k = min(int(clients_per_round), len(steps))
    rng = np.random.default_rng(seed)
    cohorts = [steps[rng.choice(len(steps), k, replace=False)] for _ in range(samples)]
    for lanes in sorted({min(math.ceil(k / slots), int(max_lanes)) for slots in range(1, k + 1)}, reverse=True):
        if np.quantile([lockstep_efficiency(c, lanes) for c in cohorts], 0.2) >= target:
            return lanes
    return 1


def make_layout(step_counts: np.ndarray, clients_per_round: int, lanes: int, *, exact_lanes: bool = False,
                bucketed: bool = False, worst_case: bool = False, prepass_counts: np.ndarray | None = None,
                buckets: tuple[int, ...] = ()) -> Layout:
    """Fixed shapes for every cohort of ``clients_per_round`` clients of this population.

    A lane's capacity is the smaller of the worst case (the ``slots`` largest clients in one lane)
    and :func:`likely_lane_load`, so memory follows the cohort, not the population's largest
    clients; ``worst_case=True`` takes the former (for a cohort that does not fit). ``lanes`` is
    capped at the cohort size unless ``exact_lanes`` (sharded rounds need one lane per device even
    when some stay empty). ``prepass_counts``: each client's prepass batches (``None``: no prepass).
    """
    lanes = max(1, int(lanes) if exact_lanes else min(int(lanes), clients_per_round))
    slots = math.ceil(clients_per_round / lanes)

    def capacity(counts):
        counts = np.asarray(counts, np.int64)
        worst = int(np.sort(counts)[::-1][:slots].sum())
        return max(1, worst if worst_case else min(worst, likely_lane_load(counts, clients_per_round, lanes)))

    pre = 0 if prepass_counts is None else capacity(prepass_counts)
    return Layout(lanes, slots, capacity(step_counts), pre, bool(bucketed), tuple(buckets) if bucketed else ())


def likely_lane_load(step_counts: np.ndarray, clients_per_round: int, lanes: int) -> int:
    """Steps of the busiest lane that a uniformly sampled cohort exceeds with negligible probability:
    the cohort total's mean plus 4 standard deviations (sampling without replacement), spread over
    the lanes, plus the largest client (heavy tails: one big client dominates a cohort's sum; and
    the imbalance between lanes)."""
    steps = np.asarray(step_counts, np.float64)
    n, k = len(steps), min(int(clients_per_round), len(step_counts))
    shrink = (n - k) / max(n - 1, 1)
    total = k * steps.mean() + 4.0 * math.sqrt(k * steps.var() * shrink)
    return int(math.ceil(total / lanes) + steps.max())


def place(steps: Sequence[int], lanes: int) -> list[tuple[int, int]]:
    """``(lane, slot)`` of each client: sorted by steps (largest first), ``lanes`` clients per slot;
    within a slot, the next largest client goes to the lane with the fewest steps so far."""
    placement: list[tuple[int, int]] = [(-1, -1)] * len(steps)
    load = np.zeros(lanes, np.int64)
    order = sorted(range(len(steps)), key=lambda i: (-int(steps[i]), i))
    for slot, start in enumerate(range(0, len(order), lanes)):
        free = list(range(lanes))
        for pos in order[start:start + lanes]:
            lane = min(free, key=lambda l: (load[l], l))
            free.remove(lane)
            placement[pos] = (lane, slot)
            load[lane] += int(steps[pos])
    return placement


def lane_loads(cohort_steps: Sequence[int], lanes: int) -> np.ndarray:
    """Steps each lane gets when this cohort is placed by :func:`place`."""
    loads = np.zeros(lanes, np.int64)
    for (lane, _), k in zip(place(list(cohort_steps), lanes), cohort_steps):
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


class RoundArrays(NamedTuple):
    """A cohort's data in fixed shapes: numpy on the host, device arrays once placed."""

    features: dict[str, np.ndarray]  # [L, T, B, ...] training batches, each lane's clients back to back
    mask: np.ndarray  # [L, T, B] float32, 1 for real examples
    bucket: np.ndarray  # [L, T] int32, index into partial_batch_buckets(B) (bucketed) or 0
    start: np.ndarray  # [L, S] int32, first training step of the client in each slot
    steps: np.ndarray  # [L, S] int32, its local steps (0 = empty slot)
    pre_features: dict[str, np.ndarray]  # [L, P, B, ...] prepass batches ({} without a prepass)
    pre_mask: np.ndarray  # [L, P, B]
    pre_start: np.ndarray  # [L, S]
    pre_steps: np.ndarray  # [L, S]
    num_examples: np.ndarray  # [L, S] float32, examples of the client in each slot (0 = empty)
    positions: np.ndarray  # [L, S] int32, cohort position of the client in each slot (-1 = empty)


class RoundInput(NamedTuple):
    """A prepared round: its arrays and the host-side bookkeeping."""

    round_index: int
    client_ids: list[str]
    placement: list[tuple[int, int]]  # cohort position -> (lane, slot)
    layout: Layout
    arrays: RoundArrays
    num_examples: np.ndarray  # [k] examples of each client, by cohort position
    real_examples: int
    computed_examples: int
    real_steps: int
    executed_steps: int  # lane-steps the compiled loops run (lanes wait for each other slot by slot)

    @property
    def padding_efficiency(self) -> float:
        return self.real_examples / max(self.computed_examples, 1)

    @property
    def useful_lane_steps(self) -> float:
        return self.real_steps / max(self.executed_steps, 1)


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


def _pack(buf: dict[str, np.ndarray], mask: np.ndarray, lane: int, start: int, examples, order: np.ndarray,
          specs: dict[str, FeatureSpec], batch_size: int) -> None:
    k = order.size // batch_size
    if examples is not None:
        take = np.maximum(order, 0)
        for name, b in buf.items():
            b[lane, start:start + k] = examples[name][take].reshape((k, batch_size) + specs[name].shape)
    mask[lane, start:start + k] = (order >= 0).reshape(k, batch_size)


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
) -> RoundInput:
    """Reads, shuffles, batches and packs one cohort into :class:`RoundArrays` (numpy).

    With ``local_lanes`` (multi-host), only the clients placed in those lanes are read;
    every lane's step metadata is still filled, so all processes agree on the plan.
    """
    sizes = np.asarray(sizes, np.int64)
    steps = spec.steps(sizes)
    L, S, T, B, P = layout.lanes, layout.slots, layout.capacity, spec.batch_size, layout.prepass_capacity
    pre_counts = prepass_steps(sizes, B) if P else np.zeros_like(sizes)
    placement = place(list(steps), L)
    # np.zeros maps fresh zero pages: the unused tail of the capacity costs no memory.
    features = {k: np.zeros((L, T, B) + s.shape, s.dtype) for k, s in specs.items()}
    mask = np.zeros((L, T, B), np.float32)
    pre_features = {k: np.zeros((L, P, B) + s.shape, s.dtype) for k, s in specs.items()} if P else {}
    pre_mask = np.zeros((L, P, B), np.float32)
    bucket = np.zeros((L, T), np.int32)
    buckets = np.asarray(sorted(set(layout.buckets) | {B}))
    start, count = np.zeros((L, S), np.int32), np.zeros((L, S), np.int32)
    pre_start, pre_count = np.zeros((L, S), np.int32), np.zeros((L, S), np.int32)
    weights = np.zeros((L, S), np.float32)
    positions = np.full((L, S), -1, np.int32)
    reads = None if local_lanes is None else set(int(lane) for lane in local_lanes)
    cursor, pre_cursor = np.zeros(L, np.int64), np.zeros(L, np.int64)
    for pos in sorted(range(len(client_ids)), key=lambda p: placement[p]):
        lane, s = placement[pos]
        k, kp = int(steps[pos]), int(pre_counts[pos])
        positions[lane, s], weights[lane, s] = pos, float(sizes[pos])
        start[lane, s], count[lane, s] = cursor[lane], k
        pre_start[lane, s], pre_count[lane, s] = pre_cursor[lane], kp
        if k == 0:
            continue
        cid = client_ids[pos]
        if cursor[lane] + k > T or pre_cursor[lane] + kp > P:
            raise RuntimeError(f"lane capacity {T} exceeded at client {cid!r}; sizes changed since fit() started?")
        examples = None
        if reads is None or lane in reads:
            examples = data.get_client(cid)
            check_client(cid, examples, specs, int(sizes[pos]))
        order = example_order(int(sizes[pos]), spec, k, client_rng(seed, round_index, population_indices[pos]))
        c = int(cursor[lane])
        _pack(features, mask, lane, c, examples, order, specs, B)
        # Padding is only ever at the end of a batch, so a step's real examples are a prefix.
        bucket[lane, c:c + k] = np.searchsorted(buckets, mask[lane, c:c + k].sum(axis=1))
        if kp:
            in_order = np.arange(kp * B)
            _pack(pre_features, pre_mask, lane, int(pre_cursor[lane]), examples,
                  np.where(in_order < sizes[pos], in_order, -1), specs, B)
        cursor[lane] += k
        pre_cursor[lane] += kp
    real = int(spec.examples_seen(sizes).sum())
    if layout.bucketed:  # lanes run one after another on their device; devices wait for the busiest
        computed = L * max(int(buckets[bucket[lane, : cursor[lane]]].sum()) for lane in range(L))
        executed = L * int((cursor + pre_cursor).max())
    else:  # lanes run in lockstep, slot by slot, until the slot's longest client is done
        executed = L * int(count.max(axis=0).sum() + pre_count.max(axis=0).sum())
        computed = executed * B
    arrays = RoundArrays(features, mask, bucket, start, count, pre_features, pre_mask, pre_start, pre_count,
                         weights, positions)
    return RoundInput(int(round_index), list(client_ids), placement, layout, arrays, sizes.astype(np.float32), real,
                      computed,
                      int(steps.sum() + pre_counts.sum()), executed)


def check_client(cid: str, examples: Examples, specs: dict[str, FeatureSpec], size: int, *,
                 what: str = "the training data") -> None:
    """Raises a clear error when a client's features differ from ``specs`` (shape, dtype kind, count)."""
    missing = sorted(set(specs) - set(examples))
    if missing:
        raise ValueError(f"{what}: client {cid!r} lacks features {missing} that other clients have; "
                         "every client needs the same features.")
    for name, fs in specs.items():
        arr = examples[name]
        if tuple(arr.shape[1:]) != fs.shape or arr.shape[0] != size:
            raise ValueError(
                f"{what}: client {cid!r}: feature {name!r} has shape {tuple(arr.shape)}, expected "
                f"({size}, {', '.join(map(str, fs.shape))}) like the other clients."
            )
        if np.dtype(arr.dtype).kind != fs.dtype.kind and not (
            np.dtype(arr.dtype).kind in "iu" and fs.dtype.kind in "iu"
        ):
            raise TypeError(f"{what}: client {cid!r}: feature {name!r} has dtype {arr.dtype}, expected {fs.dtype} "
                            "like the other clients.")
