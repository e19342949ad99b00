"""Round throughput of this checkout against another one (an earlier commit), measured interleaved.

Each measurement is ``round_throughput.py``'s fedtrain run in a fresh process; the two checkouts
alternate (old, new, old, new, ...) so a noisy machine slows both alike, and the table reports
medians and the new/old ratio of examples per second and of the first round (setup + compilation).

    git worktree add /tmp/fedtrain_old <commit>
    python benchmarks/compare_commits.py --old /tmp/fedtrain_old --repeats 3
    python benchmarks/compare_commits.py --old /tmp/fedtrain_old --workloads emnist-10 --tiny
    python benchmarks/compare_commits.py --old /tmp/fedtrain_old --workloads "" \
        --vmap-algorithms mime_lite,agnostic_fedavg,hypcluster

``--vmap-algorithms`` times those algorithms under ``backend="vmap"`` (default lanes) on EMNIST-shaped
synthetic data (500 clients of 97-291 examples, two domains, batch 10, 10 clients per round) with the
dense EMNIST model (vmapped convolutions are grouped convolutions on CPU), through the public
trainer API only, so the same worker runs against either checkout.
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


VMAP_CLIENTS_PER_ROUND = 10


def _vmap_worker(root: str, name: str, rounds: int, tiny: bool) -> None:
    sys.path.insert(0, root)
    import numpy as np
    import optax

    import fedtrain
    from fedtrain import algorithms as A

    assert os.path.dirname(os.path.dirname(os.path.abspath(fedtrain.__file__))) == os.path.abspath(root)
    rng = np.random.default_rng(0)
    sizes = rng.integers(12, 37, 60) if tiny else rng.integers(97, 292, 500)
    clients = {f"w{i:04d}": {"x": rng.random((n, 28, 28, 1), np.float32),
                             "y": rng.integers(0, 62, n).astype(np.int32),
                             "domain_id": (rng.random(n) < 0.3).astype(np.int32)} for i, n in enumerate(sizes)}
    sgd = optax.sgd(0.01)
    make = {"fedavg": lambda: A.fedavg(sgd),
            "mime_lite": lambda: A.mime_lite(optax.sgd(0.01, momentum=0.9), client_delta_clip_norm=10.0),
            "mime": lambda: A.mime(optax.sgd(0.01, momentum=0.9)),
            "agnostic_fedavg": lambda: A.agnostic_fedavg(sgd, [0.5, 0.5], domain_learning_rate=0.1),
            "hypcluster": lambda: A.hypcluster(sgd, 2)}[name]
    trainer = fedtrain.FederatedTrainer(fedtrain.models.emnist_model("dense"),
                                        fedtrain.InMemoryFederatedData(clients), make(), backend="vmap", seed=0)
    ends = []
    log = fedtrain.callbacks.LambdaCallback(on_round_end=lambda r, logs: ends.append(time.perf_counter()))
    start = time.perf_counter()
    trainer.fit(rounds=rounds, clients_per_round=VMAP_CLIENTS_PER_ROUND, batch_size=10, callbacks=[log], verbose=0)
    times = [b - a for a, b in zip([start] + ends, ends)]
    print("RESULT " + json.dumps({"first_round_s": times[0], "s_per_round": statistics.median(times[1:]),
                                  "lanes": trainer.last_round_info.get("lanes"),
                                  "useful_lane_steps": trainer.last_round_info.get("useful_lane_steps")}))


def _measure_vmap(root: str, name: str, rounds: int, tiny: bool) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--vmap-worker", root, "--algorithm", name,
           "--rounds", str(rounds)] + (["--tiny"] if tiny else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{name} from {root} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", help="a checkout of the commit to compare against (required)")
    parser.add_argument("--workloads", default="emnist-10,emnist-50,emnist-100,shakespeare-10")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, help="rounds per measurement (default: the workload's quick rounds)")
    parser.add_argument("--tiny", action="store_true", help="tiny data and models (smoke test)")
    parser.add_argument("--vmap-algorithms", default="", help="e.g. mime_lite,agnostic_fedavg,hypcluster")
    parser.add_argument("--output", default=os.path.join(HERE, "results", "compare_commits.json"))
    parser.add_argument("--vmap-worker", help=argparse.SUPPRESS)
    parser.add_argument("--algorithm", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.vmap_worker:
        _vmap_worker(args.vmap_worker, args.algorithm, args.rounds, args.tiny)
        return {}
    if not args.old:
        parser.error("--old is required: a checkout of the commit to compare against")
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
    algo_rows = []
    roots = {"old": os.path.abspath(args.old), "new": os.path.dirname(HERE)}
    for name in [a for a in args.vmap_algorithms.split(",") if a]:
        runs = {"old": [], "new": []}
        for _ in range(args.repeats):
            for side in ("old", "new"):
                runs[side].append(_measure_vmap(roots[side], name, args.rounds or 4, args.tiny))
        med = {side: statistics.median(r["s_per_round"] for r in rs) for side, rs in runs.items()}
        algo_rows.append({"algorithm": name, "old_s_per_round": med["old"], "new_s_per_round": med["new"],
                          "speedup": med["old"] / med["new"], "runs": runs})
        print(f"| vmap {name} | old {med['old']:.2f} s/round | new {med['new']:.2f} s/round | "
              f"{med['old'] / med['new']:.2f}x faster | lanes {runs['new'][0]['lanes']} |", flush=True)
    report = {"benchmark": "compare_commits", "machine": machine(), "old": _commit(args.old), "new": _commit(HERE),
              "tiny": args.tiny, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": rows,
              "vmap_algorithms": algo_rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    print("\n| workload | old ex/s | new ex/s | new/old | old first round s | new first round s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workload']} | {r['old_examples_per_s']:.0f} | {r['new_examples_per_s']:.0f} | "
              f"{r['throughput_ratio']:.2f}x | {r['old_first_round_s']:.1f} | {r['new_first_round_s']:.1f} |")
    if algo_rows:
        print("\n| vmap algorithm | old s/round | new s/round | speedup |")
        print("|---|---|---|---|")
        for r in algo_rows:
            print(f"| {r['algorithm']} | {r['old_s_per_round']:.2f} | {r['new_s_per_round']:.2f} | {r['speedup']:.2f}x |")
    print(f"\nwrote {args.output}")
    return report


if __name__ == "__main__":
    main()
