"""Learning curves as PNG: ``History.plot()`` and ``fedtrain plot RUN_DIR`` (CSV, JSON lines or event files).

The x axis is the round, 0-indexed as in the logs (the CSV's ``round``, the TensorBoard step,
``History.rounds``), with integer ticks.

With ``distribution=True`` (``fedtrain plot --distribution``) a metric logged client by client
(``val_accuracy_p10``, ``_p50``, ``_p90`` from ``fit(validation_per_client=True)``) is drawn as the band
between its 10th and 90th percentile over clients with the median, in the metric's panel.

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
_SKIP = {"round_time", "num_clients", "num_examples", "round", "epoch", "personalized_clients",
         "global_clients"}
# Suffixes of the distribution over clients (fedtrain.evaluation.summarize_clients).
_BAND = ("_p10", "_p50", "_p90")
_DISTRIBUTION = (*_BAND, "_client_mean", "_worst10")


def distribution_keys(keys: Sequence[str]) -> list[str]:
    """The metrics of ``keys`` with a full ``_p10``/``_p50``/``_p90`` band (e.g. ``val_accuracy``)."""
    present = set(keys)
    return sorted({k[:-4] for k in keys if k.endswith("_p50")
                   if all(k[:-4] + s in present for s in _BAND)})


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
        base = key[4:] if key.startswith("val_") else key
        if key in _SKIP or base in _SKIP:
            continue
        groups.setdefault(base, []).append(key)
    order = sorted(groups, key=lambda b: (b != "loss", b))
    return [(b, sorted(groups[b], key=lambda k: k.startswith("val_"))) for b in order]


def _points(x: list[int], values: Sequence[float]) -> list[tuple[int, float]]:
    ys = [float(v) if v is not None else math.nan for v in values]
    xs = x[: len(ys)] if len(x) >= len(ys) else list(range(len(ys)))
    return [(a, b) for a, b in zip(xs, ys) if math.isfinite(b)]


def plot_curves(rounds: Sequence[int], history: dict[str, Sequence[float]], path=None, *, keys=None,
                title: str | None = None, distribution: bool = False):
    """One figure, one panel per metric (training and ``val_*`` together), x = round (0-indexed, integer
    ticks), ``title`` above the panels. ``distribution=True``: metrics with per-client percentiles get
    their p10-p90 band over clients and median (:func:`distribution_keys`) instead of panels of their own."""
    Figure, FigureCanvasAgg = _matplotlib()
    from matplotlib.ticker import MaxNLocator

    wanted = [k for k in (keys or history) if k in history]
    bands = distribution_keys(list(history)) if distribution else []
    if distribution:
        if not bands:
            raise ValueError("distribution=True: no metric has per-client percentiles (m_p10, m_p50, m_p90) in "
                             f"{sorted(history)}; train with fit(validation_per_client=True).")
        wanted = [k for k in wanted if not k.endswith(_DISTRIBUTION)] + [b for b in bands if b not in wanted
                                                                          and b in history]
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
            pts = _points(x, history[key])
            if pts:
                ax.plot(*zip(*pts), marker="." if len(pts) < 50 else None,
                        label="validation" if key.startswith("val_") else "training")
            if key in bands:
                lo, mid, hi = (dict(_points(x, history[key + s])) for s in _BAND)
                common = sorted(set(lo) & set(mid) & set(hi))
                if common:
                    ax.fill_between(common, [lo[r] for r in common], [hi[r] for r in common], alpha=0.25,
                                    label="clients p10-p90")
                    ax.plot(common, [mid[r] for r in common], linestyle="--", label="clients median")
        ax.set_title(base)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(members) > 1 or any(k in bands for k in members):
            ax.legend()
    if title:
        fig.suptitle(title)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=100)
    return fig


def run_figure(run_dir: str | os.PathLike, *, title: str | None = None, distribution: bool = False):
    """The learning-curve figure of ``run_dir``, titled (by default) with the recipe in its run record
    (``fedtrain_run.json``, see :func:`fedtrain.logs.runs.read_run_record`) and the directory's name."""
    root = Path(os.path.abspath(os.fspath(run_dir)))
    rounds, history = load_run(root)
    if title is None:
        label = run_label(root)
        title = f"{label} ({root.name})" if label else root.name
    return plot_curves(rounds, history, title=title, distribution=distribution)


def plot_run(run_dir: str | os.PathLike, output: str | os.PathLike | None = None, *,
             title: str | None = None, distribution: bool = False) -> Path:
    """Writes the learning curves of ``run_dir`` (:func:`run_figure`; ``distribution``: per-client bands,
    see :func:`plot_curves`) to ``output`` (default ``RUN_DIR/curves.png``); returns the PNG's path."""
    root = Path(os.path.abspath(os.fspath(run_dir)))
    fig = run_figure(root, title=title, distribution=distribution)
    if output is None:
        out = (root if root.is_dir() else root.parent) / "curves.png"
    else:
        out = Path(os.path.abspath(os.fspath(output)))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``fedtrain plot RUN_DIR [-o FILE] [--distribution]``."""
    parser = argparse.ArgumentParser(prog="fedtrain plot", description="Plot a run's learning curves to PNG.")
    parser.add_argument("run_dir", help="directory (or file) with a CSVLogger/JSONLinesLogger file or event files")
    parser.add_argument("-o", "--output", default=None, help="PNG to write (default: RUN_DIR/curves.png)")
    parser.add_argument("--distribution", action="store_true",
                        help="draw per-client metrics as their p10-p90 band over clients and median")
    args = parser.parse_args(argv)
    try:
        out = plot_run(args.run_dir, args.output, distribution=args.distribution)
    except (FileNotFoundError, ImportError, ValueError) as e:
        parser.exit(2, f"fedtrain plot: error: {e}\n")
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
