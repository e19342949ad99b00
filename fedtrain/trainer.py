"""FederatedTrainer: the Keras-style loop around the compiled round. No math lives here."""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedtrain import distributed
from fedtrain import metrics as metrics_lib
from fedtrain.algorithms.base import Algorithm, Context, check_algorithm
from fedtrain.callbacks.base import Callback, CallbackList, History
from fedtrain.callbacks.early_stopping import TerminateOnNaN
from fedtrain.callbacks.progress import ProgressBar
from fedtrain.checks import as_federated_data, check_initial_loss, check_population
from fedtrain.client_states import ClientStateStore
from fedtrain.data.federated_data import FederatedData
from fedtrain.engine import BatchSpec, Engine, Population, RoundInput
from fedtrain.engine import hyperparams as _hp
from fedtrain.engine.feeder import RoundFeeder, population_of
from fedtrain.engine.plan import FeatureSpec, feature_specs
from fedtrain.evaluation import DEFAULT_BATCH_SIZE, Evaluator, model_shares, summarize_clients
from fedtrain.models.adapter import MASK_KEY, Model, from_nnx, loss_and_metrics
from fedtrain.samplers import UniformSampler, max_cohort


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
        check_algorithm(algorithm)
        train_data = None if train_data is None else as_federated_data(train_data, "train_data")
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
        agg = algorithm.aggregator
        self.aggregator_state = agg.init(self.model_fns.init_params) if agg.stateful else ()
        self.engine = Engine(self.model_fns, algorithm, backend, lanes, lane_group)
        # Client optimizers built with optax.inject_hyperparams get their values from the host each
        # round (as inputs of the compiled round), so schedules change them without recompiling.
        self.client_hyperparams: dict[str, np.ndarray] = {}
        self._feature_specs: dict[str, FeatureSpec] | None = None
        if train_data is not None and list(train_data.client_ids):
            self._probe_client_hyperparams(train_data)
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
        self.client_metrics: dict[str, dict[str, Any]] | None = None  # see evaluate(per_client=True)

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
        directory; returns the number of completed rounds it holds. The nnx module given to the
        constructor then holds the restored weights."""
        from fedtrain.checkpoint_format import restore_trainer

        done = restore_trainer(self, directory, step)
        self.update_module()
        return done

    def update_module(self) -> nnx.Module | None:
        """Writes (a copy of) the current parameters into the nnx module given to the constructor and
        returns it; ``fit`` and ``restore`` call it, so the module passed in is the trained model."""
        if self.module is not None:
            nnx.update(self.module, jax.tree.map(jnp.copy, self.params))
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
        validation_per_client: bool = False,
        callbacks: Sequence[Callback] | None = None,
        verbose: int | str = "auto",
        initial_round: int | None = None,
    ) -> History:
        """Runs rounds ``initial_round .. rounds-1`` (``rounds`` is the total, like Keras ``epochs``).

        ``initial_round`` defaults to the rounds already completed, so a second ``fit``
        (or a restored checkpoint) continues where training stopped. Returns the
        ``History``; ``trainer.stop_training = True`` from a callback ends after the round.
        ``validation_per_client=True`` validates with ``evaluate(per_client=True)``: the round logs
        add ``val_`` + the distribution keys (``val_accuracy_p10``, ...) and ``trainer.client_metrics``
        holds the round's per-client values (the ``TensorBoard`` callback writes their histograms).
        """
        if not isinstance(validation_per_client, bool):
            raise TypeError(f"validation_per_client must be True or False, got {validation_per_client!r}.")
        validation_data = None if validation_data is None else as_federated_data(validation_data, "validation_data")
        data, population, spec, verbose = self._start(train_data, rounds, clients_per_round, initial_round, verbose,
                                                      BatchSpec(int(batch_size), local_epochs, local_steps),
                                                      validation_data, validation_batch_size)
        callback_list = self._callback_list(callbacks, verbose, dict(
            rounds=rounds, initial_round=initial_round, clients_per_round=clients_per_round, batch_size=spec.batch_size,
            local_epochs=spec.local_epochs, local_steps=spec.local_steps, num_clients=population.size,
            backend=self.backend, algorithm=self.algorithm.name))
        self._check_dp_denominator(callback_list, population.size, clients_per_round)
        val_rounds = _validation_rounds(validation_freq)
        feeder = RoundFeeder(self.engine, self.sampler, self.seed)
        callback_list.on_train_begin({})
        logs: dict[str, float] = {}
        interrupted = None
        stop_signals = _StopSignals()  # Ctrl-C / SIGTERM stop after the round, not in the middle of its save
        try:  # a callback may have restored a checkpoint in on_train_begin (round, state, history)
            for r in range(self.round if initial_round is None else int(initial_round), rounds):
                callback_list.on_round_begin(r, {})
                t0 = time.perf_counter()
                round_input = feeder.get(r, self._clients_per_round, self.sampler)
                input_wait = time.perf_counter() - t0  # host time not hidden behind the previous round
                if r + 1 < rounds:
                    feeder.prefetch(r + 1, self._clients_per_round, self.sampler)
                callback_list.on_clients_sampled(r, list(round_input.client_ids))
                logs = self._run_round(r, round_input, callback_list)
                self.last_round_info["input_wait_s"] = input_wait
                logs["round_time"] = time.perf_counter() - t0  # training only; validation is val_time
                if validation_data is not None and val_rounds(r + 1, rounds):
                    t1 = time.perf_counter()
                    val = self.evaluate(validation_data, batch_size=validation_batch_size, callbacks=callback_list,
                                        per_client=validation_per_client)
                    logs.update({f"val_{k}": v for k, v in val.items()}, val_time=time.perf_counter() - t1)
                self.round = r + 1
                callback_list.on_round_end(r, logs)
                stop_signals.check()  # a signal during the round stops here, its save and logs done
                if self.stop_training:
                    break
        except KeyboardInterrupt as e:  # SIGINT, or SIGTERM turned into TrainingInterrupted
            interrupted = e if isinstance(e, TrainingInterrupted) else TrainingInterrupted(signal.SIGINT)
        except BaseException:
            _abort_callbacks(callback_list)  # on_train_end will not run: locks are released here
            raise
        finally:
            if interrupted is None:
                stop_signals.restore()
            feeder.close()
            self.update_module()
        if interrupted is not None:
            try:  # the handlers stay: a second signal while the save finishes raises TrainingInterrupted
                stop_signals.release()  # one that came while fit unwound to here raises now
                _finish_interrupted(callback_list, logs, interrupted)  # the in-flight save ends on disk
            except KeyboardInterrupt:  # a second signal: the in-flight save is abandoned, not waited for
                _abort_callbacks(callback_list, wait=False)
            finally:
                stop_signals.restore()
            raise interrupted from None
        try:
            callback_list.on_train_end(logs)
        except BaseException:
            _abort_callbacks(callback_list)
            raise
        return self.history

    def _start(self, train_data, rounds, clients_per_round, initial_round, verbose, spec: BatchSpec,
               validation_data=None, validation_batch_size=None):
        """Checks the arguments, the data and the algorithm on it (before any callback runs)."""
        data = as_federated_data(train_data, "train_data") if train_data is not None else self.train_data
        if data is None:
            raise ValueError("no training data: pass train_data to FederatedTrainer(...) or to fit(...).")
        self.train_data = data
        if int(rounds) < 0 or (initial_round is not None and initial_round < 0):
            raise ValueError(f"rounds and initial_round must be >= 0; got rounds={rounds}, "
                             f"initial_round={initial_round}.")
        spec = spec.validate()
        population = population_of(data, spec)
        if clients_per_round < 1:
            raise ValueError(f"clients_per_round must be >= 1, got {clients_per_round}.")
        bound = max_cohort(self.sampler, population.size, clients_per_round)
        if bound > population.size:
            raise ValueError(
                f"clients_per_round={clients_per_round} is larger than the {population.size} clients with data; "
                f"use clients_per_round <= {population.size}.")
        self._check_model_on(data, population, spec, validation_data, validation_batch_size)
        self._probe_client_hyperparams(data)
        if self.client_states is not None:  # device-resident client states get a row per client here
            self.client_states.bind(population.ids)
        verbose = (1 if sys.stdout.isatty() else 2) if verbose == "auto" else int(verbose)
        if jax.process_count() > 1:  # every process must run the same plan, or the collectives hang
            distributed.check_same_on_all_processes(
                rounds=rounds, clients_per_round=clients_per_round, batch=spec, seed=self.seed,
                algorithm=self.algorithm.name, clients=population.size, examples=int(np.sum(population.sizes)),
                initial_round=initial_round, backend=self.backend)
            verbose = verbose if distributed.is_chief() else 0
        initial_client_state = None if self.client_states is None else self.client_states.initial_state()
        self.engine.start(data, population, spec, self._feature_specs, bound, self.seed,
                          (self.server_state, self.aggregator_state, self.client_hyperparams), initial_client_state)
        self._clients_per_round = int(clients_per_round)
        if initial_round == 0:
            self.history = History()
        first = self.round if initial_round is None else int(initial_round)
        if first >= rounds:
            warnings.warn(f"fit(rounds={rounds}) trains nothing: {first} rounds are completed already and `rounds` "
                          f"is the total (like Keras' epochs). Pass rounds > {first} to train more, or "
                          "initial_round=0 to start the count over.", UserWarning, stacklevel=3)
        return data, population, spec, verbose

    def _callback_list(self, callbacks, verbose: int, params: dict) -> CallbackList:
        cbs = list(callbacks or [])
        if verbose and not any(isinstance(cb, ProgressBar) for cb in cbs):
            cbs.append(ProgressBar(verbose))
        cbs.append(self.history)
        self.callbacks = CallbackList(cbs, self, params)
        self.stop_training = False
        if verbose:
            _print_overview(self.params)
        return self.callbacks

    def _run_round(self, r: int, round_input: RoundInput, callback_list: CallbackList) -> dict[str, float]:
        result = self.engine.run(self.server_state, self.aggregator_state, self.client_hyperparams,
                                 self.client_states, round_input)
        self.server_state, self.aggregator_state = result.server_state, result.aggregator_state
        self.last_round_info = dict(result.info)
        bad = result.info["nonfinite_clients"]
        loss_bad = bad or (result.client_ids and not math.isfinite(result.logs.get("loss", 0.0)))
        if loss_bad or not result.info["state_finite"]:
            stops = any(isinstance(cb, TerminateOnNaN) for cb in callback_list.callbacks)
            what = (f"the training loss is {result.logs.get('loss')}; clients with a non-finite loss: {bad}"
                    if loss_bad else "the loss is finite but the new server state (parameters or optimizer "
                    "state) holds NaN or inf, e.g. an optimizer with eps=0 on a zero gradient")
            warnings.warn(f"round {r + 1}: {what}. Lower the learning rate or check these clients' data; checkpoints "
                          "never save a non-finite state. " +
                          ("TerminateOnNaN stops training after this round." if stops else
                           "Training goes on; add fedtrain.callbacks.TerminateOnNaN() to stop at the first "
                           "non-finite loss or state."), RuntimeWarning, stacklevel=3)
        if callback_list.wants("on_client_results"):
            callback_list.on_client_results(r, result.client_ids, result.client_logs())
        return dict(result.logs)

    def _check_dp_denominator(self, callback_list: CallbackList, num_clients: int, clients_per_round: int) -> None:
        """Warns when DP-FedAvg's fixed denominator is not the expected cohort and no DPAccountant (which
        refuses it) is attached: every server update would be scaled by cohort / denominator."""
        expected = self.algorithm.hyperparams.get("expected_clients_per_round")
        rate = getattr(self.sampler, "sampling_probability", None)
        if expected is None or rate is None:
            return
        from fedtrain.privacy import DPAccountant, check_expected_clients

        if any(isinstance(cb, DPAccountant) for cb in callback_list.callbacks):
            return
        try:
            check_expected_clients(expected, float(rate(num_clients, clients_per_round)), num_clients,
                                   clients_per_round)
        except ValueError as e:
            warnings.warn(f"{self.algorithm.name}: {str(e).removeprefix('DPAccountant: ')}", RuntimeWarning,
                          stacklevel=3)

    def _probe_client_hyperparams(self, data: FederatedData) -> None:
        """Finds the injected hyperparameters of the client optimizer (kept when already found)."""
        alg, model = self.algorithm, self.model_fns
        cid = next(c for c in data.client_ids if data.client_size(c) > 0) if self._feature_specs is None else None
        specs = self._feature_specs or feature_specs(data.get_client(cid))

        def probe(values):
            ctx = Context(model, 1, 1, tuple(sorted(specs)), rng=jax.random.key(0), num_examples=jnp.float32(1),
                          num_steps=jnp.int32(1), client_hparams=values)
            ctx = ctx._replace(broadcast=alg.broadcast(self.server_state, ctx))
            client_state = None if alg.client_state_init is None else alg.client_state_init(model.init_params)
            pre = None
            if alg.prepass is not None and alg.prepass.cohort is None:
                batch = _abstract_batch(specs, 1)
                pre = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                   jax.eval_shape(lambda b: alg.prepass.step(ctx.broadcast, b, ctx), batch))
            alg.client_init(ctx.broadcast, client_state, pre, ctx)

        try:
            found = _hp.client_defaults(probe)
        except Exception:  # the engine's abstract trace at fit() names what is wrong with the algorithm
            return
        for name, value in found.items():
            self.client_hyperparams.setdefault(name, value)

    def _check_model_on(self, data: FederatedData, population: Population, spec: BatchSpec,
                        validation_data: FederatedData | None = None, validation_batch_size: int | None = None) -> None:
        """Before anything compiles: runs the model abstractly on a batch of the first client (shape and
        dtype errors name the features), checks every client's features and the label range against the
        model's outputs (training and validation data), and the untrained model's loss."""
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
            logits = jax.eval_shape(lambda p, b: self.model_fns.apply(p, b[self.model_fns.input_key], None, False),
                                    self.model_fns.init_params, batch)
            metrics_lib.check_model_metrics(self.model_fns, batch, logits)  # (values, weights) per example
            jax.eval_shape(lambda p, b: loss_and_metrics(self.model_fns, p, b, None, False),
                           self.model_fns.init_params, batch)
        except metrics_lib.MetricContractError:
            raise
        except Exception as e:
            shapes = {k: f"{v.dtype}{list(v.shape)}" for k, v in batch.items() if k != MASK_KEY}
            raise ValueError(
                f"the model, loss or metrics cannot run on this data (batch {shapes}): "
                f"{type(e).__name__}: {e}") from e
        num_classes = int(logits.shape[-1]) if getattr(logits, "ndim", 0) else None
        labels = {m.class_labels: num_classes for m in (self.model_fns.loss, *self.model_fns.metrics)
                  if getattr(m, "class_labels", None) and num_classes}
        check_population(data, population.ids, specs, what="the training data", class_labels=labels)
        if validation_data is not None:
            self._check_validation_data(validation_data, specs, labels)
        first = self._evaluator.evaluate(self.params, data.subset([cid]),
                                         batch_size=validation_batch_size or DEFAULT_BATCH_SIZE)
        check_initial_loss(first["loss"], num_classes if labels else None)

    def _check_validation_data(self, data: FederatedData, train_specs: dict[str, FeatureSpec], labels) -> None:
        ids = [c for c in data.client_ids if data.client_size(c) > 0]
        if not ids:
            raise ValueError("validation_data has no examples; pass clients with examples, or no validation_data.")
        specs = feature_specs(data.get_client(ids[0]))
        missing = sorted({self.model_fns.input_key, *labels} - set(specs))
        if missing:
            raise ValueError(f"validation_data: client {ids[0]!r} lacks features {missing} that the model and "
                             f"metrics read (training data has {sorted(train_specs)}).")
        batch = _abstract_batch(specs, 2)
        try:  # shapes may differ from training (e.g. longer sequences) as long as the model runs on them
            jax.eval_shape(lambda p, b: loss_and_metrics(self.model_fns, p, b, None, False),
                           self.model_fns.init_params, batch)
        except Exception as e:
            shapes = {k: f"{v.dtype}{list(v.shape)}" for k, v in batch.items() if k != MASK_KEY}
            raise ValueError(f"validation_data: the model, loss or metrics cannot run on its batches {shapes}: "
                             f"{type(e).__name__}: {e}") from e
        check_population(data, ids, specs, what="validation_data", class_labels=labels)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue training exactly: server and aggregator state, client states,
        round, history."""
        return {
            "server_state": self.server_state,
            "aggregator_state": self.aggregator_state,
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
        if "aggregator_state" in state:
            if jax.tree.structure(state["aggregator_state"]) != jax.tree.structure(self.aggregator_state):
                raise ValueError(f"the saved aggregator state does not match this trainer's aggregator "
                                 f"{self.algorithm.aggregator.name!r}.")
            self.aggregator_state = jax.tree.map(jnp.asarray, state["aggregator_state"])
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
                 verbose: int = 0, select_with: FederatedData | None = None,
                 per_client: bool = False) -> dict[str, float]:
        """Loss and metrics of the current model over every example of every client of ``data``
        (a ``FederatedData``, a dict of clients or a store path), as a flat dict of floats.

        ``verbose=1`` shows a progress bar (one line at the end when stdout is not a terminal) and
        prints the metrics. For algorithms with several models (``algorithm.eval_models``, e.g.
        HypCluster) each client is evaluated on the model with the lowest loss on its examples in
        ``select_with`` (default: the training data; a client missing there selects on its own
        examples in ``data``), and the logs add ``model_share_j``.

        For algorithms with ``personal_params`` every client with stored state is evaluated on its
        personal model ``personal_params(server_state, state)``, with or without ``per_client``; the
        others (never trained) on the global model ``algorithm.params(server_state)``. The logs add
        ``personalized_clients`` and ``global_clients``; clients whose ids the training data does not
        have get one warning saying how many.

        ``per_client=True`` adds the distribution over clients (:func:`fedtrain.evaluation.summarize_clients`):
        ``m_client_mean``, ``m_p10``, ``m_p50``, ``m_p90``, ``m_worst10`` for the loss and every metric,
        and ``num_clients``; the pooled ``m`` equals a plain evaluation's. Per-client evaluations (with
        ``per_client=True``, or any of an algorithm with ``personal_params``) set
        ``trainer.client_metrics`` to ``{client_id: {"num_examples": n, "personalized": bool,
        metric: value, ...}}`` (``"model": j`` too for ``eval_models``); clients without examples are
        left out.
        """
        if not isinstance(per_client, bool):
            raise TypeError(f"per_client must be True or False, got {per_client!r}.")
        data = as_federated_data(data, "data")
        if isinstance(callbacks, CallbackList):
            callback_list = callbacks
        else:
            cbs = list(callbacks or [])
            if verbose and not any(isinstance(cb, ProgressBar) for cb in cbs):
                cbs.append(ProgressBar(int(verbose)))
            callback_list = CallbackList(cbs, self, {})
        total = _total_examples(data)
        done = [0, 0]  # examples, batches

        def progress(n: int) -> None:
            done[0] += n
            callback_list.on_test_batch_end(done[1], {"examples": done[0], "total_examples": total})
            done[1] += 1

        callback_list.on_test_begin({"total_examples": total})
        if per_client or self.algorithm.personal_params is not None:
            if total == 0:
                raise ValueError("the evaluation data has no examples; per-client evaluation needs at least one "
                                 "client with examples.")
            logs = self._evaluate_clients(data, batch_size, select_with, progress, per_client)
        elif self.algorithm.eval_models is not None:
            logs = self._evaluator.evaluate_best_of(
                self.algorithm.eval_models(self.server_state), data,
                select_with=self.train_data if select_with is None else select_with, batch_size=batch_size,
                progress=progress)
        else:
            logs = self._evaluator.evaluate(self.params, data, batch_size=batch_size, progress=progress)
        callback_list.on_test_end(logs)
        if verbose:
            print(" - ".join(f"{k}: {v:.4f}" for k, v in logs.items()))
        return logs

    def _evaluate_clients(self, data: FederatedData, batch_size, select_with, progress, per_client: bool):
        """Per-client totals on each client's model; sets ``client_metrics`` and returns the logs."""
        alg, ev = self.algorithm, self._evaluator
        ids = list(data.client_ids)
        personalized: set[str] = set()
        choice: dict[str, int] = {}
        extra: dict[str, float] = {}
        if alg.eval_models is not None:
            stacked = alg.eval_models(self.server_state)
            totals, choice = ev.best_of_client_totals(
                stacked, data, select_with=self.train_data if select_with is None else select_with,
                batch_size=batch_size, progress=progress)
            extra.update(model_shares(choice, jax.tree.leaves(stacked)[0].shape[0]))
        elif alg.personal_params is not None:
            store = self.client_states
            stateful = [c for c in ids if c in store]
            others = [c for c in ids if c not in store]
            known = set(self.train_data.client_ids) if self.train_data is not None else set()
            unknown = [c for c in others if c not in known and data.client_size(c) > 0]
            if unknown:
                warnings.warn(
                    f"{len(unknown)} of the {len(ids)} evaluation clients (e.g. {unknown[0]!r}) are not clients of "
                    f"the training data, so they have no personal model: they are evaluated on the global model "
                    f"(algorithm.params). Evaluate on data keyed by the training client ids for personalized "
                    f"results.", UserWarning, stacklevel=3)
            totals = ev.personal_totals(alg.personal_params, self.server_state, [store.get(c) for c in stateful],
                                        data, stateful, batch_size=batch_size, progress=progress)
            personalized = set(totals)
            totals.update(ev.client_totals(self.params, data, others, batch_size=batch_size, progress=progress))
            extra = {"personalized_clients": float(len(personalized)),
                     "global_clients": float(len(totals) - len(personalized))}
        else:
            totals = ev.client_totals(self.params, data, ids, batch_size=batch_size, progress=progress)
        if not totals:
            raise ValueError("the evaluation data has no examples.")
        if per_client:
            logs = summarize_clients(totals)
        else:
            logs = {}
            for name in ev.metric_names:
                s = sum(t[name][0] for t in totals.values())
                c = sum(t[name][1] for t in totals.values())
                logs[name] = s / c if c > 0 else float("nan")
        logs.update(extra)
        self.client_metrics = {}
        for cid in ids:
            if cid not in totals:
                continue
            row: dict[str, Any] = {"num_examples": int(data.client_size(cid)), "personalized": cid in personalized}
            if choice:
                row["model"] = choice[cid]
            row.update({m: s / c if c > 0 else float("nan") for m, (s, c) in totals[cid].items()})
            self.client_metrics[cid] = row
        return logs

    def fine_tune_evaluate(self, test_data, train_data=None, *, client_optimizer: optax.GradientTransformation,
                           batch_size: int, local_epochs: int | None = 1, local_steps: int | None = None,
                           eval_batch_size: int | None = None, seed: int | None = None, client_ids=None,
                           missing: str = "error", lanes: int = 8):
        """Each client of ``test_data`` fine-tunes the current global model (``trainer.params``) on its
        examples in ``train_data`` (default: the training data) and is evaluated on its test examples
        before and after: :func:`fedtrain.personalization.fine_tune_evaluate` (``seed`` defaults to the
        trainer's). Returns its :class:`~fedtrain.personalization.FineTuneResult`; the model is unchanged."""
        from fedtrain.personalization import fine_tune_evaluate

        train = as_federated_data(train_data, "train_data") if train_data is not None else self.train_data
        if train is None:
            raise ValueError("no training data to fine-tune on: pass train_data=..., or build the trainer with it.")
        return fine_tune_evaluate(self.model_fns, self.params, train, as_federated_data(test_data, "test_data"),
                                  client_optimizer=client_optimizer, batch_size=batch_size,
                                  local_epochs=local_epochs, local_steps=local_steps,
                                  eval_batch_size=eval_batch_size, seed=self.seed if seed is None else seed,
                                  client_ids=client_ids, missing=missing, lanes=lanes)

    def predict(self, x, *, batch_size: int = 256):
        """Model outputs (logits) in eval mode. ``x`` is an array with a leading batch axis (gives an
        array) or federated data (a ``FederatedData``, dict of clients or store path; gives
        ``{client_id: outputs}`` computed from each client's ``input_key`` feature)."""
        if isinstance(x, np.ndarray | jax.Array):
            return self._evaluator.predict(self.params, x, batch_size=batch_size)
        if isinstance(x, FederatedData | dict | str | os.PathLike):
            data = as_federated_data(x, "x")
            key = self.model_fns.input_key
            return {cid: self._evaluator.predict(self.params, data.get_client(cid)[key], batch_size=batch_size)
                    for cid in data.client_ids}
        arr = np.asarray(x)
        if arr.ndim == 0 or arr.dtype == object:
            raise TypeError(f"predict takes an array with a leading batch axis or federated data (a FederatedData, "
                            f"a dict of clients or a store path); got {type(x).__name__}.")
        return self._evaluator.predict(self.params, arr, batch_size=batch_size)


# ---------------------------------------------------------------------- helpers
class TrainingInterrupted(KeyboardInterrupt):
    """``fit`` was stopped by Ctrl-C (SIGINT) or SIGTERM after the callbacks finished (the in-flight
    checkpoint save is on disk); ``signum`` is the signal. A ``KeyboardInterrupt``, so code that catches
    Ctrl-C catches both."""

    def __init__(self, signum: int = signal.SIGINT):
        self.signum = int(signum)
        super().__init__(f"training stopped by {signal.Signals(self.signum).name}")


class _StopSignals:
    """While ``fit`` runs (main thread only), Ctrl-C (SIGINT) and SIGTERM stop training cleanly: the first
    signal lets the round in progress and its callbacks (checkpoint, logs) finish, then ``check()`` raises
    ``TrainingInterrupted(signum)``; a second one (also while the in-flight save finishes) raises at once and
    the save is abandoned, the newest finished step left as it was. ``restore()`` puts the previous handlers
    back. A SIGINT handler other than Python's default is left alone."""

    def __init__(self) -> None:
        self.previous: dict[int, Any] = {}
        self.pending: int | None = None
        self.second: int | None = None
        self.holding = False
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signum == signal.SIGINT and signal.getsignal(signum) is not signal.default_int_handler:
                continue
            try:
                self.previous[signum] = signal.signal(signum, self._handle)
            except (ValueError, OSError):  # no signals here (an embedded interpreter)
                pass

    def _handle(self, signum, frame) -> None:
        if self.pending is None:
            self.pending = signum
            return
        if self.holding:  # fit is between the raise and the wait for the save: raised there, not here
            self.second = signum
            return
        self._raise(signum)

    def _raise(self, signum: int) -> None:
        self.holding = True  # until release(): a signal while fit unwinds to the save is kept, not raised
        raise TrainingInterrupted(signum)

    def check(self) -> None:
        if self.pending is not None:
            self._raise(self.pending)

    def release(self) -> None:
        """Before waiting for the in-flight save: raises at once for a signal that came while fit unwound."""
        self.holding = False
        if self.second is not None:
            signum, self.second = self.second, None
            raise TrainingInterrupted(signum)

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}


def _finish_interrupted(callback_list: CallbackList, logs: dict, interrupted: TrainingInterrupted) -> None:
    """``on_train_end`` after an interruption: callbacks wait for their in-flight saves; a backup that is
    deleted at the end of a finished run (``BackupAndRestore``) is kept, since the run is to be resumed."""
    kept = [cb for cb in callback_list.callbacks if getattr(cb, "delete_checkpoint", False)]
    for cb in kept:
        cb.delete_checkpoint = False
    try:
        callback_list.on_train_end(logs)
    finally:
        for cb in kept:
            cb.delete_checkpoint = True


def _abort_callbacks(callback_list: CallbackList, wait: bool = True) -> None:
    """``fit`` ends by an exception: each callback with an ``on_train_abort(wait)`` hook (a checkpoint's lock and
    writer) is called; ``wait=False`` after a second signal (work in flight is dropped, not waited for). An error
    there is a warning, so the original exception is the one raised."""
    for cb in callback_list.callbacks:
        abort = getattr(cb, "on_train_abort", None)
        if abort is None:
            continue
        try:
            abort(wait=wait)
        except Exception as e:  # noqa: BLE001 - the exception that ended fit is the one to report
            warnings.warn(f"{type(cb).__name__}.on_train_abort failed: {type(e).__name__}: {e}", RuntimeWarning,
                          stacklevel=3)


def _total_examples(data: FederatedData) -> int:
    sizes = getattr(data, "client_sizes", None)
    return int(np.sum(sizes())) if sizes else sum(data.client_size(c) for c in data.client_ids)


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
