"""A run's learning curves read back from its logs: a ``CSVLogger`` file, a ``JSONLinesLogger``
file or TensorBoard event files. Rounds are 0-indexed everywhere: the CSV's and JSON lines' ``round``,
the TensorBoard step, ``History.rounds`` and the ``round`` argument of callbacks are the same number.

``read_run_record`` reads the run record ``fedtrain train`` keeps in its workdir and ``write_run_record``
writes it. Every log file is replaced atomically (``write_atomic``: a temporary file in the same
directory, fsync, ``os.replace``), so a crash leaves either the old or the new file, never a cut one."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

from fedtrain.logs.events import read_scalars

RUN_RECORD = "fedtrain_run.json"  # written by ``fedtrain train`` in its workdir


class RunRecordError(ValueError):
    """The run record of a workdir cannot be read (corrupt JSON, not a record)."""


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Replaces ``path`` with ``text`` so that a crash at any moment leaves the old file or the new one:
    the text goes to a temporary file in the same directory, is fsynced, and ``os.replace`` swaps it in."""
    path = Path(os.path.abspath(os.fspath(path)))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: str | os.PathLike) -> None:
    """Makes a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(os.fspath(directory), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_run_record(workdir: str | os.PathLike) -> dict | None:
    """The run record of a ``fedtrain train`` workdir (recipe, variant, config and the segments of the
    run: start round, config and start time of each), or None when there is none. A record that is not
    valid JSON raises ``RunRecordError`` naming the file and what to do."""
    f = Path(os.path.abspath(os.fspath(workdir))) / RUN_RECORD
    if not f.is_file():
        return None
    try:
        record = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunRecordError(
            f"the run record {f} is corrupt ({e}); it says which recipe and config wrote this workdir. "
            f"Restore it from a backup, or move {f.parent} aside and start over with another --workdir.") from e
    if not isinstance(record, dict) or not record.get("recipe") or not isinstance(record.get("config"), dict):
        raise RunRecordError(
            f"the run record {f} is not a fedtrain run record (no recipe or config); restore it from a backup, "
            f"or move {f.parent} aside and start over with another --workdir.")
    return record


def write_run_record(workdir: str | os.PathLike, record: dict, default=None) -> None:
    """Writes the run record of ``workdir`` atomically (see ``write_atomic``)."""
    write_atomic(Path(os.path.abspath(os.fspath(workdir))) / RUN_RECORD, json.dumps(record, indent=2, default=default))


def run_label(workdir: str | os.PathLike) -> str | None:
    """``recipe[:variant]`` from the run record of ``workdir``, or None."""
    try:
        run = read_run_record(workdir) if Path(workdir).is_dir() else None
    except RunRecordError:
        return None
    if not run or not run.get("recipe"):
        return None
    return run["recipe"] + (f":{run['variant']}" if run.get("variant") else "")


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def load_run(run_dir: str | os.PathLike) -> tuple[list[int], dict[str, list[float]]]:
    """Rounds and curves of a run directory: a CSVLogger file, else a JSON-lines log, else event files."""
    root = Path(os.path.abspath(os.fspath(run_dir)))
    if root.is_file():
        files = [root]
    else:
        files = (sorted(root.rglob("*.csv")) or sorted(root.rglob("*.jsonl"))
                 or sorted(p.parent for p in root.rglob("events.out.tfevents.*"))[:1])
    if not files:
        raise FileNotFoundError(f"no CSV, JSON-lines or TensorBoard event files under {root}.")
    f = files[0]
    if f.suffix == ".csv":
        with open(f, newline="") as fh:
            records = list(csv.DictReader(fh))
        return _from_records([{k: _num(v) for k, v in r.items()} for r in records])
    if f.suffix == ".jsonl":
        records = []
        for line in f.read_text().splitlines():
            try:
                records.append({k: _num(v) for k, v in json.loads(line).items()})
            except json.JSONDecodeError:
                continue
        return _from_records(records)
    scalars = read_scalars(root)
    series: dict[str, dict[int, float]] = {}
    for run, tags in scalars.items():
        prefix = "val_" if Path(run).name == "validation" else ""
        for tag, points in tags.items():
            for step, value in points:
                series.setdefault(prefix + tag, {})[step] = value
    steps = sorted({s for d in series.values() for s in d})
    return steps, {k: [d.get(s, math.nan) for s in steps] for k, d in series.items()}  # step = round


def _from_records(records: list[dict]) -> tuple[list[int], dict[str, list[float]]]:
    by_round = {int(r["round"]): r for r in records if math.isfinite(r.get("round", math.nan))}
    rounds = sorted(by_round)
    keys = sorted({k for r in by_round.values() for k in r if k != "round"})
    return rounds, {k: [by_round[r].get(k, math.nan) for r in rounds] for k in keys}
