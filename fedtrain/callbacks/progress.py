"""ProgressBar: a rich progress bar on a terminal, one plain line per round otherwise."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fedtrain.callbacks.base import Callback, Logs

_HIDDEN = ("round_time", "val_time", "num_clients", "num_examples")


def format_logs(logs: Logs, skip: tuple[str, ...] = _HIDDEN) -> str:
    parts = []
    for key, value in logs.items():
        if key in skip:
            continue
        parts.append(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    return " - ".join(parts)


class ProgressBar(Callback):
    """Shows "Round r/R", loss and metrics, the steady rate (rounds/s after the first round of this
    ``fit``, which includes compilation) and ETA, and an "Evaluating" bar over examples during
    evaluation.

    ``verbose=1`` draws rich bars when stdout is a terminal; ``verbose=2`` (or a non-terminal
    stdout) prints one line per round and one per evaluation.
    """

    def __init__(self, verbose: int = 1, file=None) -> None:
        super().__init__()
        self.verbose = verbose
        self.file = file
        self._progress: Progress | None = None
        self._owns_progress = False
        self._task = None
        self._eval_task = None
        self._eval_start = 0.0
        self._start = 0.0
        self._first_end: float | None = None
        self._first_round = 0
        self._console: Console | None = None
        self._in_fit = False
        self._eval_total = 0

    def _make_console(self) -> Console:
        if self._console is None:
            self._console = Console(file=self.file or sys.stdout)
        return self._console

    def _make_progress(self) -> Progress | None:
        console = self._make_console()
        if self.verbose != 1 or not console.is_terminal:
            return None
        progress = Progress(
            TextColumn("{task.description}"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[logs]}"),
            console=console, transient=False)
        progress.start()
        return progress

    def on_train_begin(self, logs=None) -> None:
        self._rounds = int(self.params.get("rounds", 0))
        given = self.params.get("initial_round")
        self._first_round = int(given if given is not None else getattr(self.trainer, "round", 0))
        self._start = time.perf_counter()
        self._first_end = None
        self._in_fit = True
        self._progress = self._make_progress()
        self._owns_progress = self._progress is not None
        if self._progress is not None:
            self._task = self._progress.add_task("Round", total=self._rounds, completed=self._first_round,
                                                 rate="", logs="")

    def rate_text(self, now: float) -> str:
        """``"first round 9.1 s"`` after the first round of this fit, then the steady rounds/s."""
        if self._first_end is None:
            self._first_end = now
            return f"first round {now - self._start:.1f} s"
        return f"{(self._done - 1) / max(now - self._first_end, 1e-9):.2f} rounds/s"

    def on_round_end(self, round: int, logs=None) -> None:
        logs = logs or {}
        self._done = round + 1 - self._first_round
        rate = self.rate_text(time.perf_counter())
        text = format_logs(logs)
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=round + 1, rate=rate, logs=text)
        else:
            self._make_console().print(f"Round {round + 1}/{self._rounds} - {rate} - {text}",
                                       highlight=False, soft_wrap=True)

    def on_test_begin(self, logs=None) -> None:
        total = int((logs or {}).get("total_examples", 0))
        self._eval_total = total
        self._eval_start = time.perf_counter()
        if self._progress is None:
            self._progress = self._make_progress()
            self._owns_progress = self._progress is not None
        if self._progress is not None:
            self._eval_task = self._progress.add_task("Evaluating", total=total or None, rate="", logs="examples")

    def on_test_batch_end(self, batch: int, logs=None) -> None:
        if self._progress is not None and self._eval_task is not None:
            done = int((logs or {}).get("examples", 0))
            rate = done / max(time.perf_counter() - self._eval_start, 1e-9)
            self._progress.update(self._eval_task, completed=done, rate=f"{rate:,.0f} examples/s")

    def on_test_end(self, logs=None) -> None:
        seconds = time.perf_counter() - self._eval_start
        if self._progress is not None and self._eval_task is not None:
            self._progress.remove_task(self._eval_task)
            self._eval_task = None
            if self._task is None and self._owns_progress:  # evaluate() outside fit
                self._progress.stop()
                self._progress = None
        elif self.verbose and self._task is None and not self._in_fit:  # fit's round line has the val_ metrics
            self._make_console().print(f"Evaluated {self._eval_total:,} examples in {seconds:.1f} s",
                                       highlight=False, soft_wrap=True)

    def on_train_end(self, logs=None) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        self._task = None
        self._in_fit = False
