"""Reading TensorBoard event files (those the ``TensorBoard`` callback writes) without TensorFlow.

Only the ``Event`` proto of tensorboardX is needed; scalars come back as ``(step, value)`` pairs,
histograms as ``(step, HistogramProto)`` pairs, keyed by run (the file's folder, e.g. ``train``) and tag.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path


def read_events(path: str | os.PathLike) -> Iterator:
    """Yields the ``Event`` protos of one event file (TFRecord framing); a torn last record ends it."""
    from tensorboardX.proto import event_pb2

    with open(path, "rb") as f:
        while True:
            header = f.read(12)
            if len(header) < 12:
                return
            (length,) = struct.unpack("<Q", header[:8])
            data = f.read(length)
            if len(data) < length or len(f.read(4)) < 4:
                return
            event = event_pb2.Event()
            event.ParseFromString(data)
            yield event


def event_files(log_dir: str | os.PathLike) -> list[Path]:
    return sorted(Path(log_dir).rglob("events.out.tfevents.*"))


def read_scalars(log_dir: str | os.PathLike) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """``{run: {tag: [(step, value), ...]}}`` for every event file under ``log_dir``
    (``run`` is the file's folder relative to ``log_dir``, e.g. ``train``); later writes of a step win."""
    out: dict[str, dict[str, dict[int, float]]] = {}
    root = Path(log_dir)
    for path in event_files(root):
        run = str(path.parent.relative_to(root)) if path.parent != root else "."
        for event in read_events(path):
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(run, {}).setdefault(v.tag, {})[int(event.step)] = float(v.simple_value)
    return {run: {tag: sorted(d.items()) for tag, d in tags.items()} for run, tags in out.items()}


def read_histograms(log_dir: str | os.PathLike) -> dict[str, dict[str, list[tuple[int, object]]]]:
    """``{run: {tag: [(step, HistogramProto), ...]}}`` for every event file under ``log_dir``."""
    out: dict[str, dict[str, list]] = {}
    root = Path(log_dir)
    for path in event_files(root):
        run = str(path.parent.relative_to(root)) if path.parent != root else "."
        for event in read_events(path):
            for v in event.summary.value:
                if v.HasField("histo"):
                    out.setdefault(run, {}).setdefault(v.tag, []).append((int(event.step), v.histo))
    return out
