"""CSVLogger and JSONLinesLogger: one row per round, written as the round ends.

``round`` is 0-indexed (like Keras' ``epoch`` column), the same number as the TensorBoard step and
``History.rounds``."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

from fedtrain.callbacks.base import Callback
from fedtrain.logs.runs import write_atomic


def _rounds_before(rows: list[dict], start: int) -> list[dict]:
    out = []
    for row in rows:
        try:
            if int(float(row.get("round", ""))) < start:
                out.append(row)
        except ValueError:
            continue
    return out


def _complete_lines(path: Path) -> str:
    """The text of ``path`` up to its last newline: a line cut short by a crash is dropped."""
    if not path.exists():
        return ""
    with open(path, newline="") as f:
        text = f.read()
    return text[:text.rfind("\n") + 1]


def _csv_text(fieldnames: list[str], rows: list[dict], sep: str) -> str:
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=fieldnames, delimiter=sep, restval="NA", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return buf.getvalue()


class CSVLogger(Callback):
    """Streams each round's logs to a CSV file (``round`` column first, 0-indexed like Keras' ``epoch``).

    Rows are appended and fsynced as each round ends. A column that first appears in a later round
    (``val_*``, ``dp_epsilon``...) is added by writing the whole file with the wider header to a temporary
    file and swapping it in with ``os.replace``; missing values are ``NA``. A crash at any moment loses at
    most the row being written. With ``append=True`` an existing file is continued, dropping any rows of
    rounds that are run again (after resuming from a checkpoint) and a last row cut short by a crash.
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

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = self._writer = None

    def _read(self) -> list[dict]:
        self._close()
        text = _complete_lines(self.filename)
        return list(csv.DictReader(io.StringIO(text, newline=""), delimiter=self.sep)) if text else []

    def _start(self, round: int) -> None:
        rows = _rounds_before(self._read(), round) if self.append else []
        self.keys = [k for k in (rows[0].keys() if rows else []) if k != "round" and k is not None]
        self._rewrite(rows)
        self._started = True

    def _rewrite(self, rows: list[dict]) -> None:
        """Swaps in the header and ``rows`` atomically, then reopens the file for appending."""
        self._close()
        write_atomic(self.filename, _csv_text(["round"] + self.keys, rows, self.sep))
        self._open()

    def _open(self) -> None:
        self._file = open(self.filename, "a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=["round"] + self.keys, delimiter=self.sep,
                                      restval="NA", extrasaction="ignore")

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
            os.fsync(self._file.fileno())

    def on_train_end(self, logs=None) -> None:
        self._close()
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

    Non-finite values are written as ``null``. Each line is appended and fsynced as its round ends, so a
    crash loses at most the line being written. ``append=True`` continues an existing file (swapped in
    atomically), dropping rows of rounds that are run again and a last line cut short by a crash.
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
        if self.append:
            for line in _complete_lines(self.filename).splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a damaged line
                if isinstance(rec, dict) and int(rec.get("round", round)) < round:
                    kept.append(line)
        write_atomic(self.filename, "".join(line + "\n" for line in kept))
        self._file = open(self.filename, "a")

    def on_round_end(self, round: int, logs=None) -> None:
        if self._file is None:
            self._start(round)
        record = {"round": round, **{k: _json_value(v) for k, v in (logs or {}).items()}}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def on_train_end(self, logs=None) -> None:
        if self._file is not None:
            self._file.close()
        self._file = None
