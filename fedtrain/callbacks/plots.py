"""Learning curves as PNG: ``History.plot()`` and ``fedtrain plot RUN_DIR`` (CSV, JSON lines or event files).

Needs matplotlib, the ``plots`` extra: ``pip install fedtrain[plots]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

# Bookkeeping logs that are not learning curves.
_SKIP = {"round_time", "num_clients", "num_examples", "round", "epoch"}


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'fedtrain[plots]' (or pip install matplotlib).") \
            from None
    return Figure, FigureCanvasAgg


def curve_groups(keys: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Panels of a learning-curve figure: each metric with its ``val_`` twin."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        if key in _SKIP:
            continue
        base = key[4:] if key.startswith("val_") else key
        groups.setdefault(base, []).append(key)
    order = sorted(groups, key=lambda b: (b != "loss", b))
    return [(b, sorted(groups[b], key=lambda k: k.startswith("val_"))) for b in order]


def plot_curves(rounds: Sequence[int], history: dict[str, Sequence[float]], path=None, *, keys=None,
                title: str | None = None):
    """One figure, one panel per metric (training and ``val_*`` together), x = round (1-based)."""
    Figure, FigureCanvasAgg = _matplotlib()
    wanted = [k for k in (keys or history) if k in history]
    groups = curve_groups(wanted)
    if not groups:
        raise ValueError(f"nothing to plot: no learning curves among {sorted(history)}.")
    cols = min(3, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig = Figure(figsize=(4.5 * cols, 3.2 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    x = [int(r) + 1 for r in rounds]
    for i, (base, members) in enumerate(groups):
        ax = fig.add_subplot(rows, cols, i + 1)
        for key in members:
            ys = [float(v) if v is not None else math.nan for v in history[key]]
            xs = x[: len(ys)] if len(x) >= len(ys) else list(range(1, len(ys) + 1))
            pts = [(a, b) for a, b in zip(xs, ys) if math.isfinite(b)]
            if pts:
                ax.plot(*zip(*pts), marker="." if len(pts) < 50 else None,
                        label="validation" if key.startswith("val_") else "training")
        ax.set_title(base)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        if len(members) > 1:
            ax.legend()
    if title:
        fig.suptitle(title)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=100)
    return fig


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def load_run(run_dir: str | os.PathLike) -> tuple[list[int], dict[str, list[float]]]:
    """Rounds and curves of a run directory: a CSVLogger file, else a JSON-lines log, else event files."""
    root = Path(run_dir)
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
    from fedtrain.callbacks.tensorboard import read_scalars

    scalars = read_scalars(root)
    series: dict[str, dict[int, float]] = {}
    for run, tags in scalars.items():
        prefix = "val_" if Path(run).name == "validation" else ""
        for tag, points in tags.items():
            for step, value in points:
                series.setdefault(prefix + tag, {})[step] = value
    steps = sorted({s for d in series.values() for s in d})
    return [s - 1 for s in steps], {k: [d.get(s, math.nan) for s in steps] for k, d in series.items()}


def _from_records(records: list[dict]) -> tuple[list[int], dict[str, list[float]]]:
    by_round = {int(r["round"]): r for r in records if math.isfinite(r.get("round", math.nan))}
    rounds = sorted(by_round)
    keys = sorted({k for r in by_round.values() for k in r if k != "round"})
    return rounds, {k: [by_round[r].get(k, math.nan) for r in rounds] for k in keys}


def plot_run(run_dir: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """Writes the learning curves of ``run_dir`` to ``output`` (default ``RUN_DIR/curves.png``)."""
    rounds, history = load_run(run_dir)
    root = Path(run_dir)
    out = Path(output) if output is not None else (root if root.is_dir() else root.parent) / "curves.png"
    plot_curves(rounds, history, out, title=root.name)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``fedtrain plot RUN_DIR [-o FILE]``."""
    parser = argparse.ArgumentParser(prog="fedtrain plot", description="Plot a run's learning curves to PNG.")
    parser.add_argument("run_dir", help="directory (or file) with a CSVLogger/JSONLinesLogger file or event files")
    parser.add_argument("-o", "--output", default=None, help="PNG to write (default: RUN_DIR/curves.png)")
    args = parser.parse_args(argv)
    try:
        out = plot_run(args.run_dir, args.output)
    except (FileNotFoundError, ImportError, ValueError) as e:
        parser.exit(2, f"fedtrain plot: error: {e}\n")
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
