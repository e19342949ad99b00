"""Compiles and runs rounds; picks the backend from the devices present."""

from __future__ import annotations

import math
import warnings

import jax
import numpy as np

from fedtrain.algorithms.base import Algorithm, RunInfo, bound
from fedtrain.engine.debug import ClientStepError, run_round_debug
from fedtrain.engine.plan import BatchSpec, Layout, RoundPlan, build_round, lane_loads, make_layout
from fedtrain.engine.round import CLIENT_AXIS, RoundOutput, make_round_fn
from fedtrain.models.adapter import Model

BACKENDS = ("auto", "scan", "vmap", "sharded", "pmap", "debug")


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


class Engine:
    """Runs rounds of ``algorithm`` on ``model`` with one backend; counts compilations."""

    def __init__(self, model: Model, algorithm: Algorithm, backend: str = "auto", lanes: int | None = None,
                 lane_group: int | None = 128):
        self.model = model
        self.algorithm = algorithm
        self.backend = resolve_backend(backend)
        self.requested_lanes = lanes
        if lane_group is not None and int(lane_group) < 1:
            raise ValueError(f"lane_group must be >= 1 (or None for no grouping), got {lane_group}.")
        self.lane_group = None if lane_group is None else int(lane_group)
        self.compilations = 0
        self._jitted: dict[tuple, object] = {}
        self._population: tuple[int | None, int | None] = (None, None)
        self.mesh = None
        self._warned_uneven = False
        self._worst_case = False
        if self.backend == "sharded":
            from jax.sharding import Mesh, NamedSharding, PartitionSpec

            self.mesh = Mesh(np.array(jax.devices()), (CLIENT_AXIS,))
            self._replicated = NamedSharding(self.mesh, PartitionSpec())
            self._by_lane = NamedSharding(self.mesh, PartitionSpec(CLIENT_AXIS))

    def lanes_per_device(self, clients_per_round: int) -> int:
        """Sharded rounds: lanes each device runs (one on CPU, else the device's share of the cohort)."""
        devices = self.mesh.size
        if self.requested_lanes:
            return max(1, math.ceil(self.requested_lanes / devices))
        return 1 if jax.default_backend() == "cpu" else math.ceil(clients_per_round / devices)

    def _grouped(self, lanes: int) -> int:
        """``lanes`` rounded up to a multiple of the lane group when it exceeds one group."""
        g = self.lane_group
        return lanes if g is None or lanes <= g else math.ceil(lanes / g) * g

    def lanes_for(self, clients_per_round: int) -> int:
        if self.backend == "vmap":
            return self._grouped(self.requested_lanes or clients_per_round)
        if self.backend == "sharded":
            return self.mesh.size * self._grouped(self.lanes_per_device(clients_per_round))
        return 1

    def layout(self, step_counts, clients_per_round: int, cohort_steps=None) -> Layout:
        """The round layout for a population with these step counts; also records the population
        size and cohort size that :meth:`run_info` reports to algorithms.

        If ``cohort_steps`` (the sampled cohort's step counts) does not fit the usual capacity,
        the engine switches to the worst-case capacity for good (one more compilation).
        """
        self._population = (len(step_counts), int(clients_per_round))
        lanes = self.lanes_for(clients_per_round)
        if self.backend == "sharded":
            if clients_per_round % lanes and not self._warned_uneven:
                self._warned_uneven = True
                warnings.warn(f"{clients_per_round} clients per round over {lanes} lanes on {self.mesh.size} devices: "
                              "the cohort is padded with empty slots; a multiple of the device count keeps every "
                              "device busy.", RuntimeWarning, stacklevel=3)
            kwargs = dict(exact_lanes=True, bucketed=self.lanes_per_device(clients_per_round) == 1)
        else:
            kwargs = dict(exact_lanes=lanes > clients_per_round)
        layout = make_layout(step_counts, clients_per_round, lanes, worst_case=self._worst_case, **kwargs)
        if cohort_steps is not None and not self._worst_case and lane_loads(cohort_steps, layout).max() > layout.capacity:
            self._worst_case = True  # an unusually heavy cohort: size lanes for the largest clients from now on
            layout = make_layout(step_counts, clients_per_round, lanes, worst_case=True, **kwargs)
        return layout

    # ------------------------------------------------------------------ device placement
    def local_lanes(self, lanes: int) -> list[int] | None:
        """Of ``lanes`` lanes, those whose device belongs to this process (multi-host);
        ``None`` when every lane is local."""
        if self.mesh is None or jax.process_count() == 1:
            return None
        per_device = lanes // self.mesh.size
        return [d * per_device + j for d, device in enumerate(self.mesh.devices.flat)
                if device.process_index == jax.process_index() for j in range(per_device)]

    def put_lanes(self, tree):
        """Moves host arrays with a leading lane axis to the device(s): split over the mesh when
        sharded (each process contributes only its own lanes), else onto the default device."""
        if self.mesh is None:
            return jax.device_put(tree)
        if jax.process_count() == 1:
            return jax.device_put(tree, self._by_lane)
        lanes = self.local_lanes(jax.tree.leaves(tree)[0].shape[0])
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
            self._by_lane, np.asarray(x)[lanes], x.shape), tree)

    def put_replicated(self, tree):
        """The server state on every device of the mesh (a no-op when already there)."""
        return tree if self.mesh is None else jax.device_put(tree, self._replicated)

    def run_info(self, plan: RoundPlan) -> RunInfo:
        num_clients, k = self._population
        return RunInfo(num_clients, k if k is not None else len(plan.client_ids),
                       tuple(sorted(plan.batch.features)))

    def bound_algorithm(self, plan: RoundPlan) -> Algorithm:
        """The algorithm specialised to this run (see ``Algorithm.bind``)."""
        return bound(self.algorithm, self.run_info(plan))

    def _count(self) -> None:
        self.compilations += 1

    def _round_fn(self, lanes: int, info: RunInfo):
        key = (lanes, info)
        fn = self._jitted.get(key)
        if fn is None:
            algorithm = bound(self.algorithm, info)
            round_fn = make_round_fn(self.model, algorithm, lanes, on_trace=self._count, mesh=self.mesh,
                                     lane_group=self.lane_group)
            if self.mesh is None:
                fn = jax.jit(round_fn)
            else:  # outputs replicated: every process can read metrics and the new state
                fn = jax.jit(round_fn, out_shardings=self._replicated)
            self._jitted[key] = fn
        return fn

    def run(self, server_state, plan: RoundPlan, device_batch, client_states, round_key) -> RoundOutput:
        if self.backend == "debug":
            return run_round_debug(self.model, self.bound_algorithm(plan), server_state, plan, client_states,
                                   round_key)
        lanes = plan.batch.weights.shape[0]
        return self._round_fn(lanes, self.run_info(plan))(self.put_replicated(server_state), device_batch,
                                                          client_states, round_key)


__all__ = ["BACKENDS", "BatchSpec", "ClientStepError", "Engine", "Layout", "RoundOutput", "RoundPlan", "RunInfo",
           "build_round", "make_layout", "resolve_backend"]
