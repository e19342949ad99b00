"""Compiles and runs rounds; picks the backend from the devices present."""

from __future__ import annotations

import jax

from fedtrain.algorithms.base import Algorithm, RunInfo, bound
from fedtrain.engine.debug import ClientStepError, run_round_debug
from fedtrain.engine.plan import BatchSpec, Layout, RoundPlan, build_round, make_layout
from fedtrain.engine.round import RoundOutput, make_round_fn
from fedtrain.models.adapter import Model

BACKENDS = ("auto", "scan", "vmap", "debug")


def resolve_backend(backend: str) -> str:
    """``auto`` is ``scan`` on CPU (vmapped convolutions become slow grouped convolutions
    there) and ``vmap`` on GPU/TPU."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}.")
    if backend == "auto":
        return "scan" if jax.default_backend() == "cpu" else "vmap"
    return backend


class Engine:
    """Runs rounds of ``algorithm`` on ``model`` with one backend; counts compilations."""

    def __init__(self, model: Model, algorithm: Algorithm, backend: str = "auto", lanes: int | None = None):
        self.model = model
        self.algorithm = algorithm
        self.backend = resolve_backend(backend)
        self.requested_lanes = lanes
        self.compilations = 0
        self._jitted: dict[tuple, object] = {}
        self._population: tuple[int | None, int | None] = (None, None)

    def lanes_for(self, clients_per_round: int) -> int:
        if self.backend == "vmap":
            return self.requested_lanes or clients_per_round
        return 1

    def layout(self, step_counts, clients_per_round: int) -> Layout:
        """The round layout for a population with these step counts; also records the population
        size and cohort size that :meth:`run_info` reports to algorithms."""
        self._population = (len(step_counts), int(clients_per_round))
        return make_layout(step_counts, clients_per_round, self.lanes_for(clients_per_round))

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
            fn = jax.jit(make_round_fn(self.model, algorithm, lanes, on_trace=self._count))
            self._jitted[key] = fn
        return fn

    def run(self, server_state, plan: RoundPlan, device_batch, client_states, round_key) -> RoundOutput:
        if self.backend == "debug":
            return run_round_debug(self.model, self.bound_algorithm(plan), server_state, plan, client_states,
                                   round_key)
        lanes = plan.batch.weights.shape[0]
        return self._round_fn(lanes, self.run_info(plan))(server_state, device_batch, client_states, round_key)


__all__ = ["BACKENDS", "BatchSpec", "ClientStepError", "Engine", "Layout", "RoundOutput", "RoundPlan", "RunInfo",
           "build_round", "make_layout", "resolve_backend"]
