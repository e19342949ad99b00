"""FederatedTrainer: the Keras-style loop around the compiled round. No math lives here."""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedtrain import distributed
from fedtrain.algorithms.base import Algorithm, RunInfo, bound
from fedtrain.callbacks.base import Callback, CallbackList, History
from fedtrain.callbacks.progress import ProgressBar
from fedtrain.client_states import ClientStateStore
from fedtrain.data.federated_data import FederatedData
from fedtrain.engine import BatchSpec, Engine, RoundPlan, build_round
from fedtrain.engine.plan import FeatureSpec, feature_specs
from fedtrain.evaluation import Evaluator
from fedtrain.models.adapter import MASK_KEY, Model, from_nnx, loss_and_metrics
from fedtrain.samplers import UniformSampler, max_cohort
from fedtrain.callbacks import hyperparams as _hp


class FederatedTrainer:
    """Trains ``model`` on ``train_data`` with ``algorithm``, one compiled program per round.

    >>> trainer = FederatedTrainer(model, train_data, fedtrain.algorithms.fedavg(optax.sgd(0.1)))
    >>> history = trainer.fit(rounds=100, clients_per_round=10, validation_data=test_data)
    >>> trainer.evaluate(test_data)   # {'loss': ..., 'accuracy': ...}

    ``model`` is a flax ``nnx.Module`` (or a :class:`fedtrain.models.Model`);
    ``loss`` and ``metrics`` are names or :mod:`fedtrain.metrics` objects;
    ``backend`` is ``"auto"``, ``"scan"``, ``"vmap"``, ``"sharded"`` (alias ``"pmap"``: lanes split
    over all devices and hosts) or ``"debug"``. ``lanes`` sets how many clients train side by side;
    more than ``lane_group`` lanes run as a scan over groups of that size (bounded memory for
    cohorts of thousands). ``client_state_placement`` (stateful algorithms such as SCAFFOLD) is
    ``"auto"`` (per-client state in device memory when the population's rows fit a quarter of it,
    else host memory), ``"device"`` or ``"host"``.
    """

    def __init__(
        self,
        model: nnx.Module | Model,
        train_data: FederatedData | None,
        algorithm: Algorithm,
        *,
        loss: Any = None,
        metrics: Sequence[Any] | None = None,
        sampler: Any = None,
        backend: str = "auto",
        seed: int = 0,
        lanes: int | None = None,
        lane_group: int | None = 128,
        input_key: str = "x",
        client_state_placement: str = "auto",
    ):
        if not isinstance(algorithm, Algorithm):
            raise TypeError(
                f"algorithm must be a fedtrain.algorithms.Algorithm (e.g. fedtrain.algorithms.fedavg(optax.sgd(0.1))); "
                f"got {type(algorithm).__name__}.")
        if isinstance(model, Model):
            if loss is not None or metrics is not None:
                raise ValueError("loss/metrics are part of a fedtrain Model already; pass them to from_nnx instead.")
            self.model_fns = model
        else:
            self.model_fns = from_nnx(model, loss=loss, metrics=metrics, input_key=input_key)
        self.module = model if isinstance(model, nnx.Module) else None
        self.algorithm = algorithm
        self.train_data = train_data
        self.sampler = sampler or UniformSampler()
        self.seed = int(seed)
        try:
            self.server_state = algorithm.init(self.model_fns.init_params)
        except Exception as e:
            raise TypeError(
                f"algorithm {algorithm.name!r} cannot be initialised with the parameters of "
                f"{self.model_fns.name}: {type(e).__name__}: {e}") from e
        # Client optimizers built with optax.inject_hyperparams get their values from the host each
        # round (as inputs of the compiled round), so schedules change them without recompiling.
        self.client_hyperparams = _hp.client_hyperparams(self.model_fns, algorithm, self.server_state)
        engine_algorithm = _hp.with_client_hyperparams(algorithm) if self.client_hyperparams else algorithm
        self.engine = Engine(self.model_fns, engine_algorithm, backend, lanes, lane_group)
        self.client_states = (ClientStateStore(algorithm.client_state_init(self.model_fns.init_params),
                                               placement=client_state_placement)
                              if algorithm.client_state_init is not None else None)
        self.round = 0  # rounds completed
        self.stop_training = False
        self.history = History()
        self.last_round_info: dict[str, Any] = {}
        self.callbacks: CallbackList | None = None
        self._clients_per_round: int | None = None
        self._evaluator = Evaluator(self.model_fns)

    # ------------------------------------------------------------------ properties
    @property
    def params(self):
        """The current global model parameters (an ``nnx.State``)."""
        return self.algorithm.params(self.server_state)

    @property
    def backend(self) -> str:
        return self.engine.backend

    @property
    def clients_per_round(self) -> int | None:
        """Cohort size of the coming rounds; a callback may change it in ``on_round_begin``."""
        return self._clients_per_round

    @clients_per_round.setter
    def clients_per_round(self, k: int) -> None:
        if int(k) < 1:
            raise ValueError(f"clients_per_round must be >= 1, got {k}.")
        self._clients_per_round = int(k)

    @property
    def hyperparams(self) -> dict[str, float]:
        """Injected hyperparameters: server ones as ``name``, client ones as ``client_name``."""
        out = _hp.server_values(self.server_state)
        out.update({f"client_{k}": float(v) for k, v in self.client_hyperparams.items()})
        return out

    def set_hyperparam(self, name: str, value: float, *, target: str = "server") -> None:
        """Sets an injected hyperparameter (e.g. ``learning_rate``) of the server or client optimizer.

        The optimizer must be built with ``optax.inject_hyperparams``; the new value is an input
        of the compiled round, so nothing recompiles.
        """
        if target == "server":
            self.server_state = _hp.set_server_value(self.server_state, name, value)
        elif target == "client":
            if name not in self.client_hyperparams:
                raise ValueError(
                    f"the client optimizer has no injected hyperparameter {name!r} "
                    f"(has {sorted(self.client_hyperparams)}); build client_tx with "
                    f"optax.inject_hyperparams(optax.sgd)(learning_rate=...).")
            self.client_hyperparams[name] = np.asarray(value, self.client_hyperparams[name].dtype)
        else:
            raise ValueError(f"target must be 'server' or 'client', got {target!r}.")

    def get_hyperparam(self, name: str, *, target: str = "server") -> float:
        """The current value of an injected hyperparameter of the server or client optimizer."""
        if target == "client":
            if name not in self.client_hyperparams:
                raise ValueError(f"the client optimizer has no injected hyperparameter {name!r} "
                                 f"(has {sorted(self.client_hyperparams)}); build client_tx with "
                                 f"optax.inject_hyperparams(optax.sgd)(learning_rate=...).")
            return float(self.client_hyperparams[name])
        values = _hp.server_values(self.server_state)
        if name not in values:
            raise ValueError(f"the server optimizer has no injected hyperparameter {name!r} (has {sorted(values)}); "
                             "build server_tx with optax.inject_hyperparams(...).")
        return values[name]

    def restore(self, directory, step: int | None = None) -> int:
        """Loads the checkpoint of ``step`` (default: the newest good one) from an OrbaxCheckpoint
        directory; returns the number of completed rounds it holds."""
        from fedtrain.callbacks.checkpoint import restore_trainer

        return restore_trainer(self, directory, step)

    def update_module(self) -> nnx.Module | None:
        """Writes the current parameters into the nnx module given to the constructor, and returns it."""
        if self.module is not None:
            nnx.update(self.module, self.params)
        return self.module

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        train_data: FederatedData | None = None,
        *,
        rounds: int,
        clients_per_round: int = 10,
        batch_size: int = 32,
        local_epochs: int | None = 1,
        local_steps: int | None = None,
        validation_data: FederatedData | None = None,
        validation_freq: int | Sequence[int] = 1,
        validation_batch_size: int | None = None,
        callbacks: Sequence[Callback] | None = None,
        verbose: int | str = "auto",
        initial_round: int | None = None,
    ) -> History:
        """Runs rounds ``initial_round .. rounds-1`` (``rounds`` is the total, like Keras ``epochs``).

        ``initial_round`` defaults to the rounds already completed, so a second ``fit``
        (or a restored checkpoint) continues where training stopped. Returns the
        ``History``; ``trainer.stop_training = True`` from a callback ends after the round.
        """
        data = train_data if train_data is not None else self.train_data
        if data is None:
            raise ValueError("no training data: pass train_data to FederatedTrainer(...) or to fit(...).")
        self.train_data = data
        rounds = int(rounds)
        if rounds < 0 or (initial_round is not None and initial_round < 0):
            raise ValueError(f"rounds and initial_round must be >= 0; got rounds={rounds}, "
                             f"initial_round={initial_round}.")
        spec = BatchSpec(int(batch_size), local_epochs, local_steps).validate()
        population = _Population.of(data, spec)
        if clients_per_round < 1:
            raise ValueError(f"clients_per_round must be >= 1, got {clients_per_round}.")
        if max_cohort(self.sampler, population.size, clients_per_round) > population.size:
            raise ValueError(
                f"clients_per_round={clients_per_round} is larger than the {population.size} clients with data; "
                f"use clients_per_round <= {population.size}.")
        self._check_model_on(data, population, spec)
        if self.client_states is not None:  # device-resident client states get a row per client here
            self.client_states.bind(population.ids)
        # Algorithms that depend on the run (population size, features such as domain_id) raise here,
        # before any callback runs; the engine binds them again per compiled round.
        bound(self.engine.algorithm, RunInfo(population.size, max_cohort(self.sampler, population.size,
                                                                         clients_per_round),
                                             tuple(sorted(self._feature_specs))))
        verbose = (1 if sys.stdout.isatty() else 2) if verbose == "auto" else int(verbose)
        if jax.process_count() > 1:  # every process must run the same plan, or the collectives hang
            distributed.check_same_on_all_processes(
                rounds=rounds, clients_per_round=clients_per_round, batch=spec, seed=self.seed,
                algorithm=self.algorithm.name, clients=population.size, examples=int(np.sum(population.sizes)),
                initial_round=initial_round, backend=self.backend)
            verbose = verbose if distributed.is_chief() else 0
        cbs = list(callbacks or [])
        if verbose and not any(isinstance(cb, ProgressBar) for cb in cbs):
            cbs.append(ProgressBar(verbose))
        if initial_round == 0:
            self.history = History()
        cbs.append(self.history)
        params = {"rounds": rounds, "initial_round": initial_round, "clients_per_round": clients_per_round,
                  "batch_size": spec.batch_size, "local_epochs": spec.local_epochs, "local_steps": spec.local_steps,
                  "num_clients": population.size, "backend": self.backend, "algorithm": self.algorithm.name}
        callback_list = CallbackList(cbs, self, params)
        self.callbacks = callback_list
        self.stop_training = False
        if verbose:
            _print_overview(self.params)
        self._clients_per_round = int(clients_per_round)
        feeder = _RoundFeeder(self, data, population, spec)
        val_rounds = _validation_rounds(validation_freq)
        callback_list.on_train_begin({})
        # A callback may have restored a checkpoint in on_train_begin (round, state, history).
        start = self.round if initial_round is None else int(initial_round)
        logs: dict[str, float] = {}
        try:
            for r in range(start, rounds):
                callback_list.on_round_begin(r, {})
                t0 = time.perf_counter()
                plan, device_batch = feeder.get(r, self._clients_per_round)
                input_wait = time.perf_counter() - t0  # host time not hidden behind the previous round
                if r + 1 < rounds:
                    feeder.prefetch(r + 1, self._clients_per_round)
                callback_list.on_clients_sampled(r, list(plan.client_ids))
                logs = self._run_round(r, plan, device_batch, callback_list)
                self.last_round_info["input_wait_s"] = input_wait
                if validation_data is not None and val_rounds(r + 1, rounds):
                    val = self.evaluate(validation_data, batch_size=validation_batch_size, callbacks=callback_list)
                    logs.update({f"val_{k}": v for k, v in val.items()})
                logs["round_time"] = time.perf_counter() - t0
                self.round = r + 1
                callback_list.on_round_end(r, logs)
                if self.stop_training:
                    break
        finally:
            feeder.close()
        callback_list.on_train_end(logs)
        return self.history

    def _run_round(self, r: int, plan: RoundPlan, device_batch, callback_list: CallbackList) -> dict[str, float]:
        round_key = jax.random.fold_in(jax.random.key(self.seed), r)
        client_states = None
        if self.client_states is not None:
            lanes, slots = plan.batch.weights.shape
            client_states = self.client_states.gather(plan.client_ids, plan.placement, lanes, slots)
            client_states = (jax.tree.map(jax.numpy.asarray, client_states) if self.backend == "debug"
                             else self.engine.put_lanes(client_states))
        if self.client_hyperparams:
            state_in = _hp.WithClientHyperparams(self.server_state, dict(self.client_hyperparams))
            out = self.engine.run(state_in, plan, device_batch, client_states, round_key)
            self.server_state = out.server_state.state
        else:
            out = self.engine.run(self.server_state, plan, device_batch, client_states, round_key)
            self.server_state = out.server_state
        if self.client_states is not None:
            self.client_states.scatter(plan.client_ids, plan.placement, out.client_states)
        metric_sums, extras, client_metrics = jax.device_get((out.metric_sums, out.extras, out.client_metrics))
        logs: dict[str, float] = {}
        for name, (total, count) in metric_sums.items():
            logs[name] = float(total) / float(count) if float(count) > 0 else float("nan")
        logs["num_clients"] = float(len(plan.client_ids))
        logs["num_examples"] = float(plan.real_examples)
        for name, value in extras.items():
            if np.ndim(value) == 0:
                logs[name] = float(value)
        self.last_round_info = {"padding_efficiency": plan.padding_efficiency, "client_ids": plan.client_ids,
                                "compilations": self.engine.compilations}
        if plan.client_ids and not math.isfinite(logs.get("loss", 0.0)):
            bad = [cid for cid, pos in zip(plan.client_ids, plan.placement)
                   if not np.isfinite(client_metrics["loss_sum"][pos])]
            self.last_round_info["nonfinite_clients"] = bad
            warnings.warn(f"round {r + 1}: the training loss is {logs['loss']}; clients with a non-finite loss: "
                          f"{bad}. Lower the learning rate or check these clients' data "
                          "(TerminateOnNaN stops training here).", RuntimeWarning, stacklevel=3)
        if callback_list.wants("on_client_results"):
            callback_list.on_client_results(r, plan.client_ids, _client_logs(plan, client_metrics))
        return logs

    def _check_model_on(self, data: FederatedData, population: "_Population", spec: BatchSpec) -> None:
        """Runs the model abstractly on one batch of the first client: shape/dtype errors surface here,
        before anything compiles, with the features named."""
        cid = population.ids[0]
        examples = data.get_client(cid)
        try:
            specs = feature_specs(examples)
        except TypeError as e:
            raise TypeError(f"client {cid!r}: {e}") from None
        self._feature_specs = specs
        if self.model_fns.input_key not in specs:
            raise ValueError(f"the model reads feature {self.model_fns.input_key!r} but client {cid!r} has "
                             f"features {sorted(specs)}; preprocess the data or pass input_key=.")
        batch = _abstract_batch(specs, spec.batch_size)
        try:
            jax.eval_shape(lambda p, b: loss_and_metrics(self.model_fns, p, b, None, False),
                           self.model_fns.init_params, batch)
        except Exception as e:
            shapes = {k: f"{v.dtype}{list(v.shape)}" for k, v in batch.items() if k != MASK_KEY}
            raise ValueError(
                f"the model, loss or metrics cannot run on this data (batch {shapes}): "
                f"{type(e).__name__}: {e}") from e

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue training exactly: server state, client states, round, history."""
        return {
            "server_state": self.server_state,
            "client_states": None if self.client_states is None else self.client_states.state_dict(),
            "round": self.round,
            "seed": self.seed,
            "algorithm": self.algorithm.name,
            "history": self.history.state_dict(),
            "client_hyperparams": {k: float(v) for k, v in self.client_hyperparams.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned; the server state must match this algorithm and model."""
        if state.get("algorithm", self.algorithm.name) != self.algorithm.name:
            raise ValueError(f"the state was saved by algorithm {state['algorithm']!r}, "
                             f"this trainer runs {self.algorithm.name!r}.")
        expected = jax.tree.structure(self.server_state)
        if jax.tree.structure(state["server_state"]) != expected:
            raise ValueError("the saved server state does not match this trainer's model/algorithm "
                             f"structure ({expected}).")
        for path_a, a, b in zip(*_paths_and_leaves(self.server_state, state["server_state"])):
            if np.shape(a) != np.shape(b):
                raise ValueError(f"saved server state {path_a} has shape {np.shape(b)}, "
                                 f"this trainer has {np.shape(a)}.")
        self.server_state = jax.tree.map(jnp.asarray, state["server_state"])
        if self.client_states is not None and state.get("client_states") is not None:
            self.client_states.load_state_dict(state["client_states"])
        self.round = int(state["round"])
        for name, value in (state.get("client_hyperparams") or {}).items():
            if name in self.client_hyperparams:
                self.client_hyperparams[name] = np.asarray(value, self.client_hyperparams[name].dtype)
        if state.get("history") is not None:
            self.history.load_state_dict(state["history"])

    # ------------------------------------------------------------------ evaluate / predict
    def evaluate(self, data: FederatedData, *, batch_size: int | None = None, callbacks=None,
                 verbose: int = 0, select_with: FederatedData | None = None) -> dict[str, float]:
        """Loss and metrics of the current model over every example of every client of ``data``.

        For algorithms with several models (``algorithm.eval_models``, e.g. HypCluster) each client
        is evaluated on the model with the lowest loss on its examples in ``select_with`` (default: the
        training data; a client missing there selects on its own examples in ``data``), and the logs
        add ``model_share_j``.
        """
        callback_list = callbacks if isinstance(callbacks, CallbackList) else CallbackList(callbacks or [], self, {})
        callback_list.on_test_begin({})
        if self.algorithm.eval_models is not None:
            logs = self._evaluator.evaluate_best_of(
                self.algorithm.eval_models(self.server_state), data,
                select_with=self.train_data if select_with is None else select_with, batch_size=batch_size)
        else:
            logs = self._evaluator.evaluate(self.params, data, batch_size=batch_size)
        callback_list.on_test_end(logs)
        if verbose:
            print(" - ".join(f"{k}: {v:.4f}" for k, v in logs.items()))
        return logs

    def predict(self, x: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
        """Model outputs (logits) for the inputs ``x`` (numpy, leading batch axis)."""
        return self._evaluator.predict(self.params, x, batch_size=batch_size)


# ---------------------------------------------------------------------- helpers
def _paths_and_leaves(reference, other):
    flat = jax.tree_util.tree_flatten_with_path(reference)[0]
    paths = [jax.tree_util.keystr(p) for p, _ in flat]
    return paths, [x for _, x in flat], jax.tree.leaves(other)


def _abstract_batch(specs: dict[str, FeatureSpec], batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    batch = {k: jax.ShapeDtypeStruct((batch_size,) + s.shape, s.dtype) for k, s in specs.items()}
    batch[MASK_KEY] = jax.ShapeDtypeStruct((batch_size,), jnp.float32)
    return batch


def _print_overview(params) -> None:
    """Prints a table of the model's parameters (names, shapes, sizes, mean/std) and their total."""
    from clu import parameter_overview

    try:
        flat = {"/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in p): np.asarray(v)
                for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
        print(parameter_overview.get_parameter_overview(flat, include_stats=True), flush=True)
    except Exception as e:  # the overview is informational; never block training on it
        print(f"(no parameter overview: {type(e).__name__}: {e})", flush=True)


def _validation_rounds(freq: int | Sequence[int]):
    if isinstance(freq, int):
        if freq < 1:
            raise ValueError(f"validation_freq must be >= 1, got {freq}.")
        return lambda done, total: done % freq == 0 or done == total
    wanted = {int(f) for f in freq}
    return lambda done, total: done in wanted


def _client_logs(plan: RoundPlan, client_metrics: dict[str, np.ndarray]) -> list[dict[str, float]]:
    names = {k[: -len("_sum")] for k in client_metrics if k.endswith("_sum")}
    out = []
    for pos, (lane, s) in enumerate(plan.placement):
        logs = {}
        for name in sorted(names):
            count = float(client_metrics[f"{name}_count"][lane, s])
            logs[name] = float(client_metrics[f"{name}_sum"][lane, s]) / count if count > 0 else float("nan")
        logs["num_examples"] = float(plan.batch.weights[lane, s])
        for k, v in client_metrics.items():
            if not k.endswith(("_sum", "_count")):
                logs[k] = float(np.asarray(v[lane, s]).reshape(-1)[0]) if np.size(v[lane, s]) == 1 else v[lane, s]
        out.append(logs)
    return out


class _Population:
    """Clients that can be sampled (non-empty ones), their sizes and step counts."""

    def __init__(self, ids: list[str], sizes: np.ndarray, steps: np.ndarray):
        self.ids, self.sizes, self.steps = ids, sizes, steps

    @property
    def size(self) -> int:
        return len(self.ids)

    @classmethod
    def of(cls, data: FederatedData, spec: BatchSpec) -> "_Population":
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
                          f"(e.g. {[ids[i] for i in empty[:3]]}).", UserWarning, stacklevel=3)
            keep = np.flatnonzero(sizes > 0)
            ids, sizes = [ids[i] for i in keep], sizes[keep]
        return cls(ids, sizes, spec.steps(sizes))


class _RoundFeeder:
    """Samples, reads, packs and transfers a round's data on a background thread, one round ahead.

    Every round's plan is a pure function of (seed, round, cohort size, sampler), so
    prefetching changes timing only, never results.
    """

    def __init__(self, trainer: FederatedTrainer, data: FederatedData, population: _Population, spec: BatchSpec):
        self.trainer, self.data, self.population, self.spec = trainer, data, population, spec
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedtrain-feeder")
        self._pending: dict[tuple, Future] = {}

    def _key(self, r: int, k: int) -> tuple:
        return (r, k, id(self.trainer.sampler))

    def _build(self, r: int, k: int):
        t = self.trainer
        pop = self.population
        sampler = t.sampler
        if hasattr(sampler, "bind"):
            sampler.bind(pop.ids, pop.sizes)
        capacity = max_cohort(sampler, pop.size, k)
        idx = np.asarray(sampler.sample(t.seed, r, pop.size, k), np.int64).reshape(-1)
        if idx.size > capacity:
            raise ValueError(f"round {r + 1}: sampler {sampler!r} returned {idx.size} clients, more than its "
                             f"max_cohort {capacity}.")
        ids = [pop.ids[i] for i in idx]
        layout = t.engine.layout(pop.steps, capacity, cohort_steps=pop.steps[idx])
        plan = build_round(self.data, ids, idx, pop.sizes[idx], self.spec, layout, t._feature_specs, t.seed, r,
                           local_lanes=t.engine.local_lanes(layout.lanes))
        device_batch = None if t.backend == "debug" else t.engine.put_lanes(plan.batch)
        return plan, device_batch

    def prefetch(self, r: int, k: int) -> None:
        key = self._key(r, k)
        if key not in self._pending:
            self._pending[key] = self._pool.submit(self._build, r, k)

    def get(self, r: int, k: int):
        self.prefetch(r, k)
        future = self._pending.pop(self._key(r, k))
        for stale in [key for key in self._pending if key[0] <= r]:
            self._pending.pop(stale).cancel()
        return future.result()

    def close(self) -> None:
        for f in self._pending.values():
            f.cancel()
        self._pool.shutdown(wait=True)
