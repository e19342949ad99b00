"""EarlyStopping and TerminateOnNaN (Keras semantics, rounds for epochs)."""

from __future__ import annotations

import math
import warnings

import numpy as np

from fedtrain.callbacks.base import Callback


def monitor_mode(monitor: str, mode: str) -> str:
    """``'min'`` or ``'max'``; ``'auto'`` is ``'max'`` for accuracy-like names (Keras' rule)."""
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"mode must be 'auto', 'min' or 'max', got {mode!r}.")
    if mode == "auto":
        name = (monitor or "").lower()
        return "max" if any(t in name for t in ("acc", "auc", "fmeasure", "precision", "recall")) else "min"
    return mode


class MonitoredMetric:
    """Reads one metric from the round's logs for a callback; a metric missing from the logs is
    warned about once, naming the callback and the metrics that are available."""

    def __init__(self, owner: str, name: str, mode: str = "auto"):
        self.owner = owner
        self.name = name
        self.mode = monitor_mode(name, mode)
        self._warned = False

    def read(self, logs) -> float | None:
        """The metric's value in ``logs``, or ``None`` (with the one-time warning) when absent."""
        value = (logs or {}).get(self.name)
        if value is None:
            if not self._warned:
                self._warned = True
                warnings.warn(f"{self.owner} is conditioned on metric {self.name!r}, which is not available. "
                              f"Available metrics are: {','.join(sorted(logs or {}))}.", RuntimeWarning,
                              stacklevel=3)
            return None
        return float(value)

    def better(self, value: float, reference: float | None, min_delta: float = 0.0) -> bool:
        """Whether ``value`` improves on ``reference`` by more than ``min_delta`` (``None``: always)."""
        if reference is None:
            return True
        if self.mode == "min":
            return value + min_delta < reference
        return value - min_delta > reference


class EarlyStopping(Callback):
    """Stops training when ``monitor`` has not improved by ``min_delta`` for ``patience`` rounds.

    ``baseline``: training stops unless the value beats it within ``patience`` rounds.
    ``restore_best_weights``: at the end, the server state returns to the best round's.
    ``start_from_round``: rounds before it are ignored (warm-up). A ``monitor`` that never
    appears in the logs is warned about once.
    """

    def __init__(self, monitor: str = "val_loss", min_delta: float = 0.0, patience: int = 0, verbose: int = 0,
                 mode: str = "auto", baseline: float | None = None, restore_best_weights: bool = False,
                 start_from_round: int = 0) -> None:
        super().__init__()
        if patience < 0:
            raise ValueError(f"patience must be >= 0, got {patience}.")
        self.monitor = monitor
        self._metric = MonitoredMetric("EarlyStopping", monitor, mode)
        self.mode = self._metric.mode
        self.min_delta = abs(float(min_delta))
        self.patience = int(patience)
        self.verbose = int(verbose)
        self.baseline = baseline
        self.restore_best_weights = bool(restore_best_weights)
        self.start_from_round = int(start_from_round)
        self._reset()

    def _reset(self) -> None:
        self.wait = 0
        self.stopped_round = 0
        self.best = math.inf if self.mode == "min" else -math.inf
        self.best_round = 0
        self.best_weights = None

    def _is_improvement(self, value: float, reference: float) -> bool:
        return self._metric.better(value, reference, self.min_delta)

    def on_train_begin(self, logs=None) -> None:
        self._reset()

    def on_round_end(self, round: int, logs=None) -> None:
        value = self._metric.read(logs)
        if value is None or round < self.start_from_round:
            return
        if self.restore_best_weights and self.best_weights is None:
            self.best_weights = self.trainer.server_state
        self.wait += 1
        finite = (getattr(self.trainer, "last_round_info", {}) or {}).get("state_finite", True)
        if finite and self._is_improvement(value, self.best):  # a non-finite state is never the best
            self.best, self.best_round = value, round
            if self.restore_best_weights:
                self.best_weights = self.trainer.server_state
            if self.baseline is None or self._is_improvement(value, float(self.baseline)):
                self.wait = 0
            return
        if self.wait >= self.patience and round > 0:
            self.stopped_round = round
            self.trainer.stop_training = True

    def on_train_end(self, logs=None) -> None:
        if self.stopped_round > 0 and self.verbose:
            print(f"Round {self.stopped_round + 1}: early stopping", flush=True)
        if self.restore_best_weights and self.best_weights is not None:
            if self.verbose:
                print(f"Restoring model weights from the end of the best round: {self.best_round + 1}.", flush=True)
            self.trainer.server_state = self.best_weights

    def state_dict(self) -> dict:
        return {"wait": self.wait, "best": self.best, "best_round": self.best_round,
                "stopped_round": self.stopped_round}

    def load_state_dict(self, state: dict) -> None:
        self.wait = int(state["wait"])
        self.best = float(state["best"])
        self.best_round = int(state["best_round"])
        self.stopped_round = int(state["stopped_round"])

    def array_state(self):
        """The best round's server state (checkpointed, so ``restore_best_weights`` survives a resume)."""
        return self.best_weights if self.restore_best_weights else None

    def load_array_state(self, tree) -> None:
        self.best_weights = tree


class TerminateOnNaN(Callback):
    """Stops training at the first round whose loss is NaN or infinite, naming the clients that
    produced it (``self.stopped_round``, ``self.bad_clients``), or whose new server state (parameters
    or optimizer state) holds NaN or inf."""

    def __init__(self) -> None:
        super().__init__()
        self.stopped_round: int | None = None
        self.bad_clients: list[str] = []

    def on_round_end(self, round: int, logs=None) -> None:
        logs = logs or {}
        loss = logs.get("loss")
        info = getattr(self.trainer, "last_round_info", {}) or {}
        state_bad = info.get("state_finite") is False
        loss_bad = loss is not None and logs.get("num_clients", 1.0) != 0.0 and not np.isfinite(loss)
        if not (loss_bad or state_bad):
            return
        self.bad_clients = list(info.get("nonfinite_clients", []))
        self.stopped_round = round
        if loss_bad:
            print(f"Round {round + 1}: invalid loss {loss}, terminating training; clients with a non-finite loss: "
                  f"{self.bad_clients}", flush=True)
        else:
            print(f"Round {round + 1}: the new server state holds NaN or inf (loss {loss}), terminating training.",
                  flush=True)
        self.trainer.stop_training = True
