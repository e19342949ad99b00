"""Callback base class, the list that dispatches hooks, History and LambdaCallback (Keras semantics)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

Logs = dict[str, float]


class Callback:
    """Base class; every hook is a no-op. ``self.trainer`` (alias ``self.model``) is set by ``fit``.

    ``on_round_begin/end`` call ``on_epoch_begin/end`` so Keras-style callbacks work unchanged.
    Rounds are 0-indexed (shown as ``round + 1``).
    """

    def __init__(self) -> None:
        self.trainer = None
        self.params: dict[str, Any] = {}

    @property
    def model(self):
        return self.trainer

    def set_trainer(self, trainer) -> None:
        self.trainer = trainer

    def set_params(self, params: dict[str, Any]) -> None:
        self.params = params

    def on_train_begin(self, logs: Logs | None = None) -> None: ...

    def on_train_end(self, logs: Logs | None = None) -> None: ...

    def on_round_begin(self, round: int, logs: Logs | None = None) -> None:
        self.on_epoch_begin(round, logs)

    def on_round_end(self, round: int, logs: Logs | None = None) -> None:
        self.on_epoch_end(round, logs)

    def on_epoch_begin(self, epoch: int, logs: Logs | None = None) -> None: ...

    def on_epoch_end(self, epoch: int, logs: Logs | None = None) -> None: ...

    def on_clients_sampled(self, round: int, client_ids: Sequence[str]) -> None: ...

    def on_client_results(self, round: int, client_ids: Sequence[str], client_logs: list[Logs]) -> None: ...

    def on_test_begin(self, logs: Logs | None = None) -> None: ...

    def on_test_batch_end(self, batch: int, logs: Logs | None = None) -> None:
        """After each evaluation batch; ``logs`` has ``examples`` (done so far) and ``total_examples``."""

    def on_test_end(self, logs: Logs | None = None) -> None: ...


def overrides(callback: Callback, hook: str) -> bool:
    return getattr(type(callback), hook) is not getattr(Callback, hook)


class History(Callback):
    """Records every round's logs: ``history.history['loss']`` etc., rounds in ``history.rounds``."""

    def __init__(self) -> None:
        super().__init__()
        self.history: dict[str, list[float]] = {}
        self.rounds: list[int] = []

    @property
    def epoch(self) -> list[int]:
        return self.rounds

    def on_round_end(self, round: int, logs: Logs | None = None) -> None:
        logs = logs or {}
        n = len(self.rounds)
        self.rounds.append(round)
        for key, value in logs.items():
            # Keys that first appear later (e.g. val_*) are back-filled with NaN so columns align.
            self.history.setdefault(key, [float("nan")] * n).append(value)
        for key, values in self.history.items():
            if len(values) < n + 1:
                values.append(float("nan"))

    def state_dict(self) -> dict:
        return {"rounds": list(self.rounds), "history": {k: list(v) for k, v in self.history.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.rounds = list(state["rounds"])
        self.history = {k: list(v) for k, v in state["history"].items()}

    def plot(self, path=None, *, keys=None, title: str | None = None):
        """Learning curves (loss, metrics and their ``val_*``) in one figure; saved as PNG if ``path``
        is given. Needs matplotlib (``pip install fedtrain[plots]``). Returns the figure
        (drawn by ``fedtrain.logs.plots.plot_curves``)."""
        from fedtrain.logs.plots import plot_curves

        return plot_curves(self.rounds, self.history, path, keys=keys, title=title)


class LambdaCallback(Callback):
    """A callback from plain functions, e.g. ``LambdaCallback(on_round_end=lambda r, logs: ...)``."""

    _HOOKS = ("on_train_begin", "on_train_end", "on_round_begin", "on_round_end", "on_epoch_begin",
              "on_epoch_end", "on_clients_sampled", "on_client_results", "on_test_begin", "on_test_end")

    def __init__(self, **hooks: Callable) -> None:
        super().__init__()
        unknown = sorted(set(hooks) - set(self._HOOKS))
        if unknown:
            raise TypeError(f"LambdaCallback got unknown hooks {unknown}; known: {list(self._HOOKS)}.")
        for name, fn in hooks.items():
            setattr(self, name, fn)
        self._given = set(hooks)
        # Keras semantics: a given on_epoch_* is called by the round hooks (and not twice).
        if "on_epoch_begin" in hooks and "on_round_begin" not in hooks:
            self.on_round_begin = lambda r, logs=None: hooks["on_epoch_begin"](r, logs)
        if "on_epoch_end" in hooks and "on_round_end" not in hooks:
            self.on_round_end = lambda r, logs=None: hooks["on_epoch_end"](r, logs)

    def wants(self, hook: str) -> bool:
        return hook in self._given


class CallbackList:
    """Dispatches each hook to every callback in order; History always runs last."""

    def __init__(self, callbacks: Iterable[Callback], trainer, params: dict[str, Any]):
        callbacks = list(callbacks)
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks must be fedtrain.callbacks.Callback instances; got {type(cb).__name__}.")
        # History runs last; callbacks that save the round's state (``runs_late``) just before it,
        # so they see the logs as every other callback left them.
        histories = [cb for cb in callbacks if isinstance(cb, History)]
        rest = [cb for cb in callbacks if not isinstance(cb, History)]
        late = [cb for cb in rest if getattr(cb, "runs_late", False)]
        self.callbacks = [cb for cb in rest if cb not in late] + late + histories
        for cb in self.callbacks:
            cb.set_trainer(trainer)
            cb.set_params(params)

    def wants(self, hook: str) -> bool:
        return any(cb.wants(hook) if hasattr(cb, "wants") else overrides(cb, hook) for cb in self.callbacks)

    def __getattr__(self, hook: str):
        if not hook.startswith("on_"):
            raise AttributeError(hook)

        def call(*args, **kwargs):
            for cb in self.callbacks:
                getattr(cb, hook)(*args, **kwargs)

        return call
