"""CSVLogger and JSONLinesLogger: one row per round, written as the round ends.

``round`` is 0-indexed (like Keras' ``epoch`` column), the same number as the TensorBoard step and
``History.rounds``."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

from fedtrain.callbacks.base import Callback


def _rounds_before(rows: list[dict], start: int) -> list[dict]:
    out = []
    for row in rows:
        try:
            if int(float(row.get("round", ""))) < start:
                out.append(row)
        except ValueError:
            continue
    return out


class CSVLogger(Callback):
    """Streams each round's logs to a CSV file (``round`` column first, 0-indexed like Keras' ``epoch``).

    A column that first appears in a later round (``val_*``, ``dp_epsilon``...) is added by
    rewriting the file with the wider header; missing values are ``NA``. With
    ``append=True`` an existing file is continued, dropping any rows of rounds that are
    run again (after resuming from a checkpoint).
    """

    def __init__(self, filename: str | os.PathLike, separator: str = ",", append: bool = False) -> None:
        super().__init__()
        self.filename = Path(os.path.abspath(os.fspath(filename)))
        self.sep = separator
        self.append = bool(append)
        self.keys: list[str] = []
        self._started = False
        self._file = None
        self._writer = None

    def on_train_begin(self, logs=None) -> None:
        self._started = False
        self.filename.parent.mkdir(parents=True, exist_ok=True)

    def _read(self) -> list[dict]:
        if self._file is not None:
            self._file.close()
            self._file = None
        if not self.filename.exists():
            return []
        with open(self.filename, newline="") as f:
            return list(csv.DictReader(f, delimiter=self.sep))

    def _start(self, round: int) -> None:
        rows = _rounds_before(self._read(), round) if self.append else []
        self.keys = [k for k in (rows[0].keys() if rows else []) if k != "round"]
        self._rewrite(rows)
        self._started = True

    def _rewrite(self, rows: list[dict]) -> None:
        self._file = open(self.filename, "w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=["round"] + self.keys, delimiter=self.sep,
                                      restval="NA")
        self._writer.writeheader()
        for row in rows:
            self._writer.writerow(row)
        self._file.flush()

    def on_round_end(self, round: int, logs=None) -> None:
        logs = logs or {}
        if not self._started:
            self._start(round)
        row = {"round": round, **{k: _fmt(v) for k, v in logs.items()}}
        new = [k for k in logs if k not in self.keys]
        if new:
            rows = self._read()
            self.keys += new
            self._rewrite(rows + [row])
        else:
            self._writer.writerow(row)
            self._file.flush()

    def on_train_end(self, logs=None) -> None:
        if self._file is not None:
            self._file.close()
        self._file = self._writer = None
        self._started = False


def _fmt(value):
    if isinstance(value, float):
        return repr(value)
    return value


def _json_value(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


class JSONLinesLogger(Callback):
    """Writes one JSON object per round (``{"round": r, "loss": ...}``) to ``filename``.

    Non-finite values are written as ``null``. ``append=True`` continues an existing
    file, dropping rows of rounds that are run again.
    """

    def __init__(self, filename: str | os.PathLike, append: bool = False) -> None:
        super().__init__()
        self.filename = Path(os.path.abspath(os.fspath(filename)))
        self.append = bool(append)
        self._file = None

    def on_train_begin(self, logs=None) -> None:
        self.filename.parent.mkdir(parents=True, exist_ok=True)

    def _start(self, round: int) -> None:
        kept = []
        if self.append and self.filename.exists():
            for line in self.filename.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                if int(rec.get("round", round)) < round:
                    kept.append(line)
        self._file = open(self.filename, "w")
        for line in kept:
            self._file.write(line + "\n")

    def on_round_end(self, round: int, logs=None) -> None:
        if self._file is None:
            self._start(round)
        record = {"round": round, **{k: _json_value(v) for k, v in (logs or {}).items()}}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

    def on_train_end(self, logs=None) -> None:
        if self._file is not None:
            self._file.close()
        self._file = None
