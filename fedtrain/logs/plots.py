"""Learning curves as PNG: ``History.plot()`` and ``fedtrain plot RUN_DIR`` (CSV, JSON lines or event files).

Needs matplotlib, the ``plots`` extra: ``pip install fedtrain[plots]``; it is imported only when a
figure is drawn.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from pathlib import Path

from fedtrain.logs.runs import load_run

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
