"""Learning curves as PNG: ``History.plot()`` and ``fedtrain plot RUN_DIR`` (CSV, JSON lines or event files).

The x axis is the round, 0-indexed as in the logs (the CSV's ``round``, the TensorBoard step,
``History.rounds``), with integer ticks.

Needs matplotlib, the ``plots`` extra: ``pip install fedtrain[plots]``; it is imported only when a
figure is drawn.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from pathlib import Path

from fedtrain.logs.runs import load_run, run_label

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
    """One figure, one panel per metric (training and ``val_*`` together), x = round (0-indexed, integer
    ticks), ``title`` above the panels."""
    Figure, FigureCanvasAgg = _matplotlib()
    from matplotlib.ticker import MaxNLocator

    wanted = [k for k in (keys or history) if k in history]
    groups = curve_groups(wanted)
    if not groups:
        raise ValueError(f"nothing to plot: no learning curves among {sorted(history)}.")
    cols = min(3, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig = Figure(figsize=(4.5 * cols, 3.2 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    x = [int(r) for r in rounds]
    for i, (base, members) in enumerate(groups):
        ax = fig.add_subplot(rows, cols, i + 1)
        for key in members:
            ys = [float(v) if v is not None else math.nan for v in history[key]]
            xs = x[: len(ys)] if len(x) >= len(ys) else list(range(len(ys)))
            pts = [(a, b) for a, b in zip(xs, ys) if math.isfinite(b)]
            if pts:
                ax.plot(*zip(*pts), marker="." if len(pts) < 50 else None,
                        label="validation" if key.startswith("val_") else "training")
        ax.set_title(base)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(members) > 1:
            ax.legend()
    if title:
        fig.suptitle(title)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=100)
    return fig


def run_figure(run_dir: str | os.PathLike, *, title: str | None = None):
    """The learning-curve figure of ``run_dir``, titled (by default) with the recipe in its run record
    (``fedtrain_run.json``, see :func:`fedtrain.logs.runs.read_run_record`) and the directory's name."""
    root = Path(os.path.abspath(os.fspath(run_dir)))
    rounds, history = load_run(root)
    if title is None:
        label = run_label(root)
        title = f"{label} ({root.name})" if label else root.name
    return plot_curves(rounds, history, title=title)


def plot_run(run_dir: str | os.PathLike, output: str | os.PathLike | None = None, *,
             title: str | None = None) -> Path:
    """Writes the learning curves of ``run_dir`` (:func:`run_figure`) to ``output`` (default
    ``RUN_DIR/curves.png``); returns the PNG's path."""
    root = Path(os.path.abspath(os.fspath(run_dir)))
    fig = run_figure(root, title=title)
    if output is None:
        out = (root if root.is_dir() else root.parent) / "curves.png"
    else:
        out = Path(os.path.abspath(os.fspath(output)))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100)
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
