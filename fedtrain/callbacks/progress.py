"""ProgressBar: a rich progress bar on a terminal, one plain line per round otherwise."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fedtrain.callbacks.base import Callback, Logs

_HIDDEN = ("round_time", "num_clients", "num_examples")


def format_logs(logs: Logs, skip: tuple[str, ...] = _HIDDEN) -> str:
    parts = []
    for key, value in logs.items():
        if key in skip:
            continue
        parts.append(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    return " - ".join(parts)


class ProgressBar(Callback):
    """Shows "Round r/R", loss and metrics, rounds/s and ETA.

    ``verbose=1`` draws a rich bar when stdout is a terminal; ``verbose=2`` (or a
    non-terminal stdout) prints one line per round.
    """

    def __init__(self, verbose: int = 1, file=None) -> None:
        super().__init__()
        self.verbose = verbose
        self.file = file
        self._progress: Progress | None = None
        self._task = None
        self._start = 0.0
        self._first_round = 0

    def on_train_begin(self, logs=None) -> None:
        self._rounds = int(self.params.get("rounds", 0))
        given = self.params.get("initial_round")
        self._first_round = int(given if given is not None else getattr(self.trainer, "round", 0))
        self._start = time.perf_counter()
        console = Console(file=self.file or sys.stdout)
        self._console = console
        if self.verbose == 1 and console.is_terminal:
            self._progress = Progress(
                TextColumn("Round"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[logs]}"),
                console=console, transient=False)
            self._progress.start()
            self._task = self._progress.add_task("fit", total=self._rounds, completed=self._first_round,
                                                 rate="", logs="")

    def on_round_end(self, round: int, logs=None) -> None:
        logs = logs or {}
        done = round + 1 - self._first_round
        rate = done / max(time.perf_counter() - self._start, 1e-9)
        text = format_logs(logs)
        if self._progress is not None:
            self._progress.update(self._task, completed=round + 1, rate=f"{rate:.2f} rounds/s", logs=text)
        else:
            self._console.print(f"Round {round + 1}/{self._rounds} - {rate:.2f} rounds/s - {text}",
                                highlight=False, soft_wrap=True)

    def on_train_end(self, logs=None) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
