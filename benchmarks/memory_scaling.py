"""Peak host memory against cohort size and population size (a stateful algorithm, SCAFFOLD).

Populations are EMNIST-shaped synthetic clients generated on the fly (only a size
table per client is held), the model is logistic regression (48,670 parameters,
so each SCAFFOLD control variate is 190 KB). Client states live in host memory
(``client_state_placement="host"``: one row per client seen so far; only the cohort's rows go to
the device). The default ``"auto"`` would keep a small population's rows in a device table (on CPU,
host RAM too) sized for the whole population, up to its budget. Each
configuration runs in its own process; peak RSS is the process maximum.

    python benchmarks/memory_scaling.py            # populations 3,400 / 34,000 / 342,477 x cohorts 10 / 100 / 1,000
    python benchmarks/memory_scaling.py --quick    # fewer configurations
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_one(population: int, cohort: int, rounds: int) -> dict:
    from flax import nnx

    import fedtrain
    from fedtrain.data.synthetic import SyntheticFederatedData
    from fedtrain.models.emnist import EmnistLogistic

    baseline = rss_mb()
    data = SyntheticFederatedData.like("emnist", num_clients=population, mean_size=40).preprocess(
        lambda ex: {"x": ex["pixels"][..., None], "y": ex["label"]})
    trainer = fedtrain.FederatedTrainer(EmnistLogistic(62, rngs=nnx.Rngs(0)), data,
                                        fedtrain.algorithms.scaffold(0.05), seed=0, client_state_placement="host")
    start = time.perf_counter()
    trainer.fit(rounds=rounds, clients_per_round=cohort, batch_size=20, verbose=0)
    elapsed = time.perf_counter() - start
    return {"population": population, "cohort": cohort, "rounds": rounds,
            "client_state_rows": len(trainer.client_states), "baseline_rss_mb": baseline,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "s_per_round": elapsed / rounds}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="two small configurations (smoke test)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                         "memory_scaling.json"))
    parser.add_argument("--worker", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(run_one(*args.worker, args.rounds)))
        return []
    if args.tiny:
        configs = [(200, 5), (2000, 5)]
    elif args.quick:
        configs = [(3400, 10), (342_477, 10), (3400, 100), (342_477, 100)]
    else:
        configs = [(p, c) for c in (10, 100, 1000) for p in (3400, 34_000, 342_477)]
    results = []
    print("| population | cohort | rounds | client-state rows | peak RSS MB | above baseline MB | s/round |")
    print("|---|---|---|---|---|---|---|")
    for population, cohort in configs:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(population), str(cohort),
               "--rounds", str(args.rounds)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"population {population}, cohort {cohort} failed:\n{proc.stderr[-3000:]}")
        res = json.loads(lines[-1][len("RESULT "):])
        results.append(res)
        print(f"| {population:,} | {cohort:,} | {res['rounds']} | {res['client_state_rows']:,} | "
              f"{res['peak_rss_mb']:.0f} | {res['peak_rss_mb'] - res['baseline_rss_mb']:.0f} | "
              f"{res['s_per_round']:.2f} |", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"benchmark": "memory_scaling", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                   "results": results}, f, indent=2)
    print(f"\nwrote {args.output}")
    return results


if __name__ == "__main__":
    main()
