"""Compiles and runs rounds; picks the backend from the devices present."""

from __future__ import annotations

import jax

from fedtrain.algorithms.base import Algorithm
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
        self._jitted: dict[int, object] = {}

    def lanes_for(self, clients_per_round: int) -> int:
        if self.backend == "vmap":
            return self.requested_lanes or clients_per_round
        return 1

    def layout(self, step_counts, clients_per_round: int) -> Layout:
        return make_layout(step_counts, clients_per_round, self.lanes_for(clients_per_round))

    def _count(self) -> None:
        self.compilations += 1

    def _round_fn(self, lanes: int):
        fn = self._jitted.get(lanes)
        if fn is None:
            fn = jax.jit(make_round_fn(self.model, self.algorithm, lanes, on_trace=self._count))
            self._jitted[lanes] = fn
        return fn

    def run(self, server_state, plan: RoundPlan, device_batch, client_states, round_key) -> RoundOutput:
        if self.backend == "debug":
            return run_round_debug(self.model, self.algorithm, server_state, plan, client_states, round_key)
        lanes = plan.batch.weights.shape[0]
        return self._round_fn(lanes)(server_state, device_batch, client_states, round_key)


__all__ = ["BACKENDS", "BatchSpec", "ClientStepError", "Engine", "Layout", "RoundOutput", "RoundPlan",
           "build_round", "make_layout", "resolve_backend"]
