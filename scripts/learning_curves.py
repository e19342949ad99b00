"""Compares long runs of recipes: one PNG of validation accuracy per round, and a JSON summary.

Each RUN is a ``fedtrain train`` workdir (its ``metrics.csv``), labelled ``LABEL=WORKDIR``:

    python scripts/learning_curves.py shakespeare_fedavg=runs/shk_fedavg shakespeare_fedadam=runs/shk_fedadam \
        --reference 0.569 --reference-label "Reddi et al. FedAvg (TFF split)" -o docs/shakespeare_long_runs.png

The summary holds, per run: rounds done, training wall time (sum of ``round_time``), the last and the
best validation accuracy, and the mean over the last ``--window`` validation points.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedtrain.logs.plots import _matplotlib  # noqa: E402
from fedtrain.logs.runs import load_run  # noqa: E402


def summarize(rounds: list[int], history: dict[str, list[float]], metric: str, window: int) -> dict:
    points = [(r + 1, v) for r, v in zip(rounds, history.get(metric, [])) if math.isfinite(v)]
    times = [t for t in history.get("round_time", []) if math.isfinite(t)]
    if not points:
        raise ValueError(f"no {metric!r} values in the run; train with validation (config.validation_freq).")
    last = points[-window:]
    return {"rounds": max(r for r in rounds) + 1, "train_seconds": round(sum(times), 1),
            f"last_{metric}": points[-1][1], f"last_round_with_{metric}": points[-1][0],
            f"best_{metric}": max(v for _, v in points),
            f"mean_{metric}_last_{len(last)}_points": sum(v for _, v in last) / len(last),
            "curve": points}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="LABEL=WORKDIR")
    parser.add_argument("--metric", default="val_accuracy")
    parser.add_argument("--reference", type=float, help="a published value to draw as a horizontal line")
    parser.add_argument("--reference-label", default="published")
    parser.add_argument("--window", type=int, default=4, help="validation points averaged at the end")
    parser.add_argument("--title", default=None)
    parser.add_argument("-o", "--output", required=True, help="PNG to write; the JSON summary goes next to it")
    args = parser.parse_args(argv)

    summaries = {}
    for spec in args.runs:
        label, sep, workdir = spec.partition("=")
        if not sep:
            parser.error(f"{spec!r}: write runs as LABEL=WORKDIR")
        rounds, history = load_run(workdir)
        summaries[label] = summarize(rounds, history, args.metric, args.window)

    Figure, FigureCanvasAgg = _matplotlib()
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, s in summaries.items():
        xs, ys = zip(*s["curve"])
        ax.plot(xs, ys, marker=".", label=f"{label} ({s[f'last_{args.metric}']:.1%} at round {xs[-1]})")
    if args.reference is not None:
        ax.axhline(args.reference, color="gray", linestyle="--", label=f"{args.reference_label} {args.reference:.1%}")
    ax.set_xlabel("round")
    ax.set_ylabel(args.metric)
    ax.set_title(args.title or "validation accuracy per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    out.with_suffix(".json").write_text(json.dumps(summaries, indent=1) + "\n")
    for label, s in summaries.items():
        print(f"{label:28s} rounds {s['rounds']:5d}  train {s['train_seconds'] / 60:6.1f} min  "
              f"last {s[f'last_{args.metric}']:.4f}  best {s[f'best_{args.metric}']:.4f}")
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
