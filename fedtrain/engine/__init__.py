"""The engine owns the round: it lays out a cohort (:meth:`Engine.prepare`), compiles the round once
and runs it (:meth:`Engine.run`), on the backend chosen from the devices present."""

from __future__ import annotations

import math
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedtrain.algorithms.base import Algorithm, Context, check_algorithm
from fedtrain.data.federated_data import FederatedData
from fedtrain.engine.debug import ClientStepError, run_round_debug
from fedtrain.engine.plan import (BatchSpec, FeatureSpec, Layout, RoundArrays, RoundInput, build_round, choose_buckets,
                                  choose_lanes, lane_loads, make_layout, prepass_steps)
from fedtrain.engine.round import CLIENT_AXIS, STATE_FINITE, RoundOutputs, make_round_fn
from fedtrain.models.adapter import Model

BACKENDS = ("auto", "scan", "vmap", "sharded", "pmap", "debug")
BUCKET_GAIN = 0.015
PyTree = Any


def resolve_backend(backend: str) -> str:
    """``auto`` is ``sharded`` when JAX sees several devices (or hosts), else ``scan`` on CPU
    (vmapped convolutions become slow grouped convolutions there) and ``vmap`` on GPU/TPU.
    ``pmap`` is another name for ``sharded``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}.")
    if backend == "pmap":
        return "sharded"
    if backend == "auto":
        if jax.device_count() > 1:
            return "sharded"
        return "scan" if jax.default_backend() == "cpu" else "vmap"
    return backend


class Population(NamedTuple):
    """Clients that can be sampled (non-empty ones), their sizes and local step counts."""

    ids: list[str]
    sizes: np.ndarray
    steps: np.ndarray

    @property
    def size(self) -> int:
        return len(self.ids)


class Run(NamedTuple):
    """What stays fixed during one ``fit``: set by :meth:`Engine.start`."""

    data: FederatedData
    population: Population
    spec: BatchSpec
    features: dict[str, FeatureSpec]
    seed: int
    context: Context


class RoundResult(NamedTuple):
    """A finished round. ``client_metrics[name][i]`` is cohort position ``i``'s value."""

    server_state: PyTree
    aggregator_state: PyTree
    logs: dict[str, float]
    client_ids: list[str]
    client_metrics: dict[str, np.ndarray]
    info: dict[str, Any]

    def client_logs(self) -> list[dict[str, Any]]:
        """One dict of logs per client of the cohort (Keras-style names: ``loss``, ``accuracy``, ...)."""
        out = []
        for i in range(len(self.client_ids)):
            logs = {}
            for name, values in self.client_metrics.items():
                v = values[i]
                logs[name] = float(np.asarray(v).reshape(-1)[0]) if np.size(v) == 1 else v
            out.append(logs)
        return out


class Engine:
    """Runs rounds of ``algorithm`` on ``model`` with one backend; counts compilations."""

    def __init__(self, model: Model, algorithm: Algorithm, backend: str = "auto", lanes: int | None = None,
                 lane_group: int | None = 128):
        check_algorithm(algorithm)
        self.model = model
        self.algorithm = algorithm
        self.backend = resolve_backend(backend)
        if lanes is not None and int(lanes) < 1:
            raise ValueError(f"lanes must be >= 1 (or None to choose from the cohort), got {lanes}.")
        self.requested_lanes = lanes
        if lane_group is not None and int(lane_group) < 1:
            raise ValueError(f"lane_group must be >= 1 (or None for no grouping), got {lane_group}.")
        self.lane_group = None if lane_group is None else int(lane_group)
        self.compilations = 0
        self.mesh = None
        self.run_spec: Run | None = None
        self._jitted: dict[tuple, Any] = {}
        self._lock = threading.Lock()
        self._layout_cache: dict[tuple, Layout] = {}
        self._warm: Future | None = None
        if self.backend == "sharded":
            from jax.sharding import Mesh, NamedSharding, PartitionSpec

            self.mesh = Mesh(np.array(jax.devices()), (CLIENT_AXIS,))
            self._replicated = NamedSharding(self.mesh, PartitionSpec())
            self._by_lane = NamedSharding(self.mesh, PartitionSpec(CLIENT_AXIS))

    # ------------------------------------------------------------------ a run
    def start(self, data: FederatedData, population: Population, spec: BatchSpec, features: dict[str, FeatureSpec],
              clients_per_round: int, seed: int, state: tuple, client_state_init: PyTree = None) -> None:
        """Fixes the run's facts and checks the algorithm on them: the round is traced abstractly, so a
        malformed algorithm or a missing feature raises here, naming the function. The compilation
        then starts on a background thread (the first round's data is read meanwhile).

        ``state = (server_state, aggregator_state, client_hparams)``."""
        context = Context(self.model, population.size, int(clients_per_round), tuple(sorted(features)))
        self.run_spec = Run(data, population, spec, features, int(seed), context)
        self._layout_cache = {}
        layout = self.layout(int(clients_per_round))
        args = self._abstract_args(layout, state, client_state_init)
        if self.backend == "debug":  # the same round, traced once abstractly
            jax.eval_shape(make_round_fn(self.algorithm, context, buckets=(), batch_size=spec.batch_size), *args)
            return
        lowered = self._round_fn(layout).lower(*args)  # traces: algorithm errors surface here
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedtrain-compile")
        self._warm = pool.submit(lowered.compile)
        pool.shutdown(wait=False)

    def lanes_for(self, clients_per_round: int) -> tuple[int, bool]:
        """``(lanes, bucketed)`` for cohorts of this size; ``bucketed``: one lane per device."""
        k = int(clients_per_round)
        run = self.run_spec
        if self.backend in ("scan", "debug"):
            return 1, True
        work = run.population.steps + (prepass_steps(run.population.sizes, run.spec.batch_size)
                                       if self.algorithm.prepass is not None else 0)
        if self.backend == "vmap":
            if self.requested_lanes:
                return self._grouped(self.requested_lanes), False
            return self._grouped(choose_lanes(work, k, k), down=True), False
        devices = self.mesh.size
        if self.requested_lanes:
            per_device = max(1, math.ceil(self.requested_lanes / devices))
        elif jax.default_backend() == "cpu":
            per_device = 1
        else:
            per_device = max(1, choose_lanes(work, k, k) // devices)
            return devices * self._grouped(per_device, down=True), per_device == 1
        return devices * self._grouped(per_device), per_device == 1

    def _grouped(self, lanes: int, down: bool = False) -> int:
        """``lanes`` as a multiple of the lane group when it exceeds one group: rounded up (the lanes
        asked for), or ``down`` (a chosen lane count: fewer, fuller lanes instead of empty ones)."""
        g = self.lane_group
        if g is None or lanes <= g:
            return lanes
        return (lanes // g if down else math.ceil(lanes / g)) * g

    def _layouts(self, clients_per_round: int, worst_case: bool) -> Layout:
        key = (clients_per_round, worst_case)
        with self._lock:  # memoized: a pure function of the run and the cohort size
            if key not in self._layout_cache:
                self._layout_cache[key] = self._make_layout(clients_per_round, worst_case)
            return self._layout_cache[key]

    def _make_layout(self, clients_per_round: int, worst_case: bool) -> Layout:
        run = self.run_spec
        lanes, bucketed = self.lanes_for(clients_per_round)
        exact = self.backend == "sharded" or lanes > clients_per_round
        if self.backend == "sharded" and clients_per_round % lanes:
            warnings.warn(f"{clients_per_round} clients per round over {lanes} lanes on {self.mesh.size} devices: "
                          "the cohort is padded with empty slots; a multiple of the device count keeps every "
                          "device busy.", RuntimeWarning, stacklevel=4)
        pre = (prepass_steps(run.population.sizes, run.spec.batch_size)
               if self.algorithm.prepass is not None else None)
        # Each partial-batch shape compiles the step again (about 2.5 s more first round for the EMNIST
        # CNN): keep only those that save at least BUCKET_GAIN of the compute.
        buckets = choose_buckets(run.population.sizes, run.spec, BUCKET_GAIN) if bucketed else ()
        return make_layout(run.population.steps, clients_per_round, lanes, exact_lanes=exact, bucketed=bucketed,
                           worst_case=worst_case, prepass_counts=pre, buckets=buckets)

    def layout(self, clients_per_round: int, cohort: np.ndarray | None = None) -> Layout:
        """The fixed shapes for cohorts of this size; a cohort (population indices) too heavy for the
        usual capacity gets the worst-case shapes (one more compilation, for that shape)."""
        layout = self._layouts(int(clients_per_round), False)
        if cohort is not None:
            run = self.run_spec
            loads = lane_loads(run.population.steps[cohort], layout.lanes)
            pre = prepass_steps(run.population.sizes[cohort], run.spec.batch_size)
            pre_loads = lane_loads(pre, layout.lanes) if layout.prepass_capacity else np.zeros(1)
            if loads.max() > layout.capacity or (layout.prepass_capacity and pre_loads.max() > layout.prepass_capacity):
                layout = self._layouts(int(clients_per_round), True)
        return layout

    def prepare(self, round_index: int, cohort: np.ndarray, clients_per_round: int) -> RoundInput:
        """Reads and packs the cohort (population indices) of a round and moves it to the device(s).
        Reads only the run's fixed facts: safe to call on a background thread."""
        run = self.run_spec
        pop = run.population
        cohort = np.asarray(cohort, np.int64).reshape(-1)
        layout = self.layout(clients_per_round, cohort)
        ids = [pop.ids[i] for i in cohort]
        round_input = build_round(run.data, ids, cohort, pop.sizes[cohort], run.spec, layout, run.features, run.seed,
                                  round_index, local_lanes=self._local_lanes(layout.lanes))
        if self.backend == "debug":
            return round_input
        return round_input._replace(arrays=self._put_lanes(round_input.arrays))

    def run(self, server_state, aggregator_state, client_hparams: dict, client_states, round_input: RoundInput
            ) -> RoundResult:
        """Runs one prepared round; ``client_states`` is the run's ``ClientStateStore`` (or ``None``)."""
        ri = round_input
        lanes, slots = ri.layout.lanes, ri.layout.slots
        cstates = None
        if client_states is not None:
            cstates = client_states.gather(ri.client_ids, ri.placement, lanes, slots)
            cstates = jax.tree.map(jnp.asarray, cstates) if self.backend == "debug" else self._put_lanes(cstates)
        round_key = jax.random.fold_in(jax.random.key(self.run_spec.seed), ri.round_index)
        hparams = {k: jnp.asarray(v) for k, v in client_hparams.items()}
        if self.backend == "debug":
            out = self._debug_round(server_state, aggregator_state, hparams, cstates, ri, round_key)
        else:
            if self._warm is not None:
                self._warm.result()
                self._warm = None
            # Host values (numpy) become replicated arrays on every process; the key goes as its raw data.
            server_state, aggregator_state, hparams, key_data, index = self._put_replicated(
                (server_state, aggregator_state, {k: np.asarray(v) for k, v in client_hparams.items()},
                 np.asarray(jax.random.key_data(round_key)), np.int32(ri.round_index)))
            out = self._round_fn(ri.layout)(server_state, aggregator_state, hparams, cstates, ri.arrays, key_data,
                                            index)
        if client_states is not None:
            client_states.scatter(ri.client_ids, ri.placement, out.slots.client_state)
        return self._result(ri, out)

    # ------------------------------------------------------------------ internals
    def _debug_round(self, server_state, agg_state, hparams, cstates, ri, round_key) -> RoundOutputs:
        return run_round_debug(self.algorithm, self.run_spec.context, server_state, agg_state, hparams, cstates, ri,
                               round_key)

    def _count(self) -> None:
        self.compilations += 1

    def _round_fn(self, layout: Layout):
        key = layout
        with self._lock:
            fn = self._jitted.get(key)
            if fn is None:
                round_fn = make_round_fn(self.algorithm, self.run_spec.context, buckets=layout.buckets,
                                         batch_size=self.run_spec.spec.batch_size, mesh=self.mesh,
                                         lane_group=self.lane_group, on_trace=self._count)
                # The aggregator state and the cohort's client states are replaced every round (sharded
                # rounds return client states replicated, so their lane-split inputs cannot be reused).
                kw = dict(donate_argnums=(1, 3) if self.mesh is None else (1,))
                if self.mesh is not None:  # outputs replicated: every process can read metrics and the new state
                    kw["out_shardings"] = self._replicated
                fn = self._jitted[key] = jax.jit(round_fn, **kw)
        return fn

    def _abstract_args(self, layout: Layout, state: tuple, client_state_init) -> tuple:
        run = self.run_spec
        L, S, T, P, B = layout.lanes, layout.slots, layout.capacity, layout.prepass_capacity, run.spec.batch_size

        def spec(shape, dtype, lane=True):
            sharding = None if self.mesh is None else (self._by_lane if lane else self._replicated)
            return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

        feats = {k: spec((L, T, B) + f.shape, f.dtype) for k, f in run.features.items()}
        pre = {k: spec((L, P, B) + f.shape, f.dtype) for k, f in run.features.items()} if P else {}
        i32 = np.int32
        arrays = RoundArrays(feats, spec((L, T, B), np.float32), spec((L, T), i32), spec((L, S), i32),
                             spec((L, S), i32), pre, spec((L, P, B), np.float32), spec((L, S), i32),
                             spec((L, S), i32), spec((L, S), np.float32), spec((L, S), i32))
        server_state, agg_state, hparams = state
        like = lambda x: spec(np.shape(x), jnp.asarray(x).dtype, lane=False)  # noqa: E731
        cstates = None if client_state_init is None else jax.tree.map(
            lambda x: spec((L, S) + np.shape(x), jnp.asarray(x).dtype), client_state_init)
        key = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
        return (jax.tree.map(like, server_state), jax.tree.map(like, agg_state),
                {k: like(v) for k, v in hparams.items()}, cstates, arrays,
                spec(key.shape, key.dtype, lane=False), spec((), i32, lane=False))

    def _local_lanes(self, lanes: int) -> list[int] | None:
        """Of ``lanes`` lanes, those whose device belongs to this process (multi-host);
        ``None`` when every lane is local."""
        if self.mesh is None or jax.process_count() == 1:
            return None
        per_device = lanes // self.mesh.size
        return [d * per_device + j for d, device in enumerate(self.mesh.devices.flat)
                if device.process_index == jax.process_index() for j in range(per_device)]

    def _put_lanes(self, tree):
        """Host arrays with a leading lane axis onto the device(s): split over the mesh when sharded
        (each process contributes only its own lanes), else onto the default device."""
        if self.mesh is None:
            return jax.device_put(tree)
        if jax.process_count() == 1:
            return jax.device_put(tree, self._by_lane)
        lanes = self._local_lanes(jax.tree.leaves(tree)[0].shape[0])
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
            self._by_lane, np.asarray(x)[lanes], x.shape), tree)

    def _put_replicated(self, tree):
        return tree if self.mesh is None else jax.device_put(tree, self._replicated)

    def _result(self, ri: RoundInput, out: RoundOutputs) -> RoundResult:
        slots, metrics = jax.device_get((out.slots._replace(client_state=None), out.metrics))
        metrics = dict(metrics)
        state_finite = bool(metrics.pop(STATE_FINITE))
        lanes, idx = zip(*ri.placement) if ri.placement else ((), ())
        at = (np.asarray(lanes, np.int64), np.asarray(idx, np.int64))
        client: dict[str, np.ndarray] = {}
        logs: dict[str, float] = {}
        bad = np.zeros(len(ri.client_ids), bool)
        for name, (total, count) in slots.metric_sums.items():
            t, c = np.asarray(total)[at], np.asarray(count)[at]
            if name == "loss":
                bad = (c > 0) & ~np.isfinite(t)
            client[name] = np.where(c > 0, t / np.where(c > 0, c, 1), np.nan)
            n = float(np.sum(c))
            logs[name] = float(np.sum(t)) / n if n > 0 else float("nan")
        client["num_examples"] = ri.num_examples
        client["update_norm"] = np.asarray(slots.update_norm)[at]
        for name, value in slots.metrics.items():
            client[name] = np.asarray(value)[at]
        logs["num_clients"] = float(len(ri.client_ids))
        logs["num_examples"] = float(ri.real_examples)
        logs.update({k: float(v) for k, v in metrics.items() if np.ndim(v) == 0})
        bad = [cid for cid, b in zip(ri.client_ids, bad) if b]
        info = {"client_ids": ri.client_ids, "padding_efficiency": ri.padding_efficiency,
                "useful_lane_steps": ri.useful_lane_steps, "lanes": ri.layout.lanes, "slots": ri.layout.slots,
                "capacity": ri.layout.capacity, "compilations": self.compilations, "nonfinite_clients": bad,
                "state_finite": state_finite}
        return RoundResult(out.server_state, out.aggregator_state, logs, ri.client_ids, client, info)


__all__ = ["BACKENDS", "BatchSpec", "ClientStepError", "Engine", "Layout", "Population", "RoundInput", "RoundResult",
           "build_round", "make_layout", "resolve_backend"]
