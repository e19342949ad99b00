"""LearningRateScheduler and ReduceLROnPlateau for the server or client optimizer.

The optimizer must be built with ``optax.inject_hyperparams``, e.g.
``optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)``; a new rate is an
input of the compiled round, so changing it never recompiles.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

from fedtrain.callbacks.base import Callback
from fedtrain.callbacks.early_stopping import MonitoredMetric


def _log_key(target: str, name: str) -> str:
    return name if target == "server" else f"client_{name}"


def _check_target(target: str) -> str:
    if target not in ("server", "client"):
        raise ValueError(f"target must be 'server' or 'client', got {target!r}.")
    return target


class LearningRateScheduler(Callback):
    """At the start of each round sets the rate to ``schedule(round, rate)`` (or ``schedule(round)``).

    ``target`` is ``'server'`` or ``'client'``; ``name`` is the injected hyperparameter
    (default ``learning_rate``). The rate in use is logged as ``learning_rate``
    (``client_learning_rate`` for clients).
    """

    def __init__(self, schedule: Callable, verbose: int = 0, *, target: str = "server",
                 name: str = "learning_rate") -> None:
        super().__init__()
        self.schedule = schedule
        self.verbose = int(verbose)
        self.target = _check_target(target)
        self.name = name
        try:
            self._two_args = len(inspect.signature(schedule).parameters) >= 2
        except (TypeError, ValueError):
            self._two_args = True

    def on_train_begin(self, logs=None) -> None:
        self.trainer.get_hyperparam(self.name, target=self.target)  # fails early with a clear message

    def on_round_begin(self, round: int, logs=None) -> None:
        current = self.trainer.get_hyperparam(self.name, target=self.target)
        value = self.schedule(round, current) if self._two_args else self.schedule(round)
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"the schedule must return a number, got {value!r} for round {round}.") from None
        if not math.isfinite(value):
            raise ValueError(f"the schedule returned {value} for round {round + 1}.")
        self.trainer.set_hyperparam(self.name, value, target=self.target)
        if self.verbose:
            print(f"Round {round + 1}: LearningRateScheduler setting the {self.target} {self.name} to {value:.6g}.",
                  flush=True)

    def on_round_end(self, round: int, logs=None) -> None:
        if logs is not None:
            logs[_log_key(self.target, self.name)] = self.trainer.get_hyperparam(self.name, target=self.target)


class ReduceLROnPlateau(Callback):
    """Multiplies the rate by ``factor`` when ``monitor`` has not improved for ``patience`` rounds.

    Keras arguments: ``min_delta`` (smallest improvement), ``cooldown`` (rounds to wait
    after a reduction), ``min_lr`` (lower bound). ``target`` is ``'server'`` (default)
    or ``'client'``.
    """

    def __init__(self, monitor: str = "val_loss", factor: float = 0.1, patience: int = 10, verbose: int = 0,
                 mode: str = "auto", min_delta: float = 1e-4, cooldown: int = 0, min_lr: float = 0.0, *,
                 target: str = "server", name: str = "learning_rate") -> None:
        super().__init__()
        if factor >= 1.0:
            raise ValueError(f"ReduceLROnPlateau does not support a factor >= 1.0, got {factor}.")
        self.monitor = monitor
        self.factor = float(factor)
        self.patience = int(patience)
        self.verbose = int(verbose)
        self._metric = MonitoredMetric("ReduceLROnPlateau", monitor, mode)
        self.mode = self._metric.mode
        self.min_delta = float(min_delta)
        self.cooldown = int(cooldown)
        self.min_lr = float(min_lr)
        self.target = _check_target(target)
        self.name = name
        self._reset()

    def _reset(self) -> None:
        self.wait = 0
        self.cooldown_counter = 0
        self.best = math.inf if self.mode == "min" else -math.inf

    def _better(self, value: float) -> bool:
        return self._metric.better(value, self.best, self.min_delta)

    def on_train_begin(self, logs=None) -> None:
        self._reset()
        self.trainer.get_hyperparam(self.name, target=self.target)

    def on_round_end(self, round: int, logs=None) -> None:
        logs = logs if logs is not None else {}
        rate = self.trainer.get_hyperparam(self.name, target=self.target)
        logs[_log_key(self.target, self.name)] = rate
        value = self._metric.read(logs)
        if value is None:
            return
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
        if self._better(value):
            self.best = value
            self.wait = 0
        elif self.cooldown_counter <= 0:
            self.wait += 1
            if self.wait >= self.patience and rate > self.min_lr:
                new = max(rate * self.factor, self.min_lr)
                self.trainer.set_hyperparam(self.name, new, target=self.target)
                if self.verbose:
                    print(f"Round {round + 1}: ReduceLROnPlateau reducing the {self.target} {self.name} to {new:.6g}.",
                          flush=True)
                self.cooldown_counter = self.cooldown
                self.wait = 0

    def state_dict(self) -> dict:
        return {"wait": self.wait, "cooldown_counter": self.cooldown_counter, "best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.wait = int(state["wait"])
        self.cooldown_counter = int(state["cooldown_counter"])
        self.best = float(state["best"])
