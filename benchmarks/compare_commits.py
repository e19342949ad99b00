"""Round throughput of this checkout against another one (an earlier commit), measured interleaved.

Each measurement is ``round_throughput.py``'s fedtrain run in a fresh process; the two checkouts
alternate (old, new, old, new, ...) so a noisy machine slows both alike, and the table reports
medians and the new/old ratio of examples per second and of the first round (setup + compilation).

    git worktree add /tmp/fedtrain_old <commit>
    python benchmarks/compare_commits.py --old /tmp/fedtrain_old --repeats 3
    python benchmarks/compare_commits.py --old /tmp/fedtrain_old --workloads emnist-10 --tiny
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from round_throughput import WORKLOADS, machine, measure  # noqa: E402


def _commit(checkout: str) -> str:
    out = subprocess.run(["git", "-C", checkout, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "?"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="a checkout of the commit to compare against")
    parser.add_argument("--workloads", default="emnist-10,emnist-50,emnist-100,shakespeare-10")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, help="rounds per measurement (default: the workload's quick rounds)")
    parser.add_argument("--tiny", action="store_true", help="tiny data and models (smoke test)")
    parser.add_argument("--output", default=os.path.join(HERE, "results", "compare_commits.json"))
    args = parser.parse_args(argv)
    scripts = {"old": os.path.join(os.path.abspath(args.old), "benchmarks", "round_throughput.py"),
               "new": os.path.join(HERE, "round_throughput.py")}
    rows = []
    for name in [w for w in args.workloads.split(",") if w]:
        rounds = args.rounds or WORKLOADS[name]["quick_rounds"]
        runs = {"old": [], "new": []}
        for _ in range(args.repeats):
            for side in ("old", "new"):
                runs[side].append(measure(name, "fedtrain", rounds, args.tiny, script=scripts[side]))
        med = {side: {k: statistics.median(r[k] for r in rs) for k in ("examples_per_s", "first_round_s",
                                                                        "s_per_round")}
               for side, rs in runs.items()}
        row = {"workload": name, "rounds": rounds, "repeats": args.repeats, **{f"{s}_{k}": v for s in med
                                                                              for k, v in med[s].items()},
               "throughput_ratio": med["new"]["examples_per_s"] / med["old"]["examples_per_s"],
               "first_round_ratio": med["new"]["first_round_s"] / med["old"]["first_round_s"],
               "backend": runs["new"][0]["backend"], "runs": runs}
        rows.append(row)
        print(f"| {name} | old {med['old']['examples_per_s']:.0f} ex/s, first {med['old']['first_round_s']:.1f} s "
              f"| new {med['new']['examples_per_s']:.0f} ex/s, first {med['new']['first_round_s']:.1f} s "
              f"| throughput {row['throughput_ratio']:.2f}x | first round {row['first_round_ratio']:.2f}x |",
              flush=True)
    report = {"benchmark": "compare_commits", "machine": machine(), "old": _commit(args.old), "new": _commit(HERE),
              "tiny": args.tiny, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    print("\n| workload | old ex/s | new ex/s | new/old | old first round s | new first round s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workload']} | {r['old_examples_per_s']:.0f} | {r['new_examples_per_s']:.0f} | "
              f"{r['throughput_ratio']:.2f}x | {r['old_first_round_s']:.1f} | {r['new_first_round_s']:.1f} |")
    print(f"\nwrote {args.output}")
    return report


if __name__ == "__main__":
    main()
