"""Round time of every algorithm relative to FedAvg on the same workload, measured in one run.

Workload: round_throughput's EMNIST task (FedJAX's EMNIST CNN on synthetic EMNIST-shaped data,
500 clients of ~194 examples, client SGD lr 0.001, batch 10, 1 epoch), 10 clients per round, with
a ``domain_id`` feature (two domains) added to every example so that every algorithm, Agnostic
FedAvg included, trains on the same data. All algorithms train in one process, round by round in
turn, so that every ratio compares rounds run under the same machine load; a round's time covers
gathering client states, the compiled round, scattering states and fetching the round's metrics
(host-side batching is excluded). The first (compiling) round is reported apart.

Targets from the issue: SCAFFOLD and MimeLite within 1.3x of FedAvg's round time, DP-FedAvg within 1.2x.

    python benchmarks/algorithms.py                  # all algorithms, prints a table
    python benchmarks/algorithms.py --tiny --quick   # smoke test
    python benchmarks/algorithms.py --algorithms fedavg,scaffold --rounds 6
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np
import round_throughput as rt

CLIENTS_PER_ROUND = 10
TARGETS = {"scaffold": 1.3, "mime_lite": 1.3, "mime_lite_first_batch": 1.3, "dp_fedavg": 1.2,
           "dp_fedavg_adaptive": 1.2}


def algorithms(client_lr: float) -> dict:
    import optax

    from fedtrain import aggregators as agg
    from fedtrain import algorithms as A

    sgd = optax.sgd(client_lr)
    return {
        "fedavg": lambda: A.fedavg(sgd),
        "fedprox": lambda: A.fedprox(sgd, mu=0.01),
        "scaffold": lambda: A.scaffold(client_lr),
        "mime_lite": lambda: A.mime_lite(optax.sgd(client_lr, momentum=0.9), client_delta_clip_norm=10.0),
        "mime_lite_first_batch": lambda: A.mime_lite(optax.sgd(client_lr, momentum=0.9), client_delta_clip_norm=10.0,
                                                     full_batch_gradient=False),
        "mime": lambda: A.mime(optax.sgd(client_lr, momentum=0.9)),
        "agnostic_fedavg": lambda: A.agnostic_fedavg(sgd, [0.5, 0.5], domain_learning_rate=0.1),
        "hypcluster": lambda: A.hypcluster(sgd, 2),
        "dp_fedavg": lambda: A.dp_fedavg(sgd, 1.0, 0.1, CLIENTS_PER_ROUND),
        "dp_fedavg_adaptive": lambda: A.dp_fedavg(sgd, 1.0, 0.1, CLIENTS_PER_ROUND, adaptive_clipping=True),
        "fedavg_uniform_quantization": lambda: A.fedavg(sgd, aggregator=agg.chain(agg.uniform_quantization(16),
                                                                                  agg.weighted_mean())),
        "fedavg_rotated_quantization": lambda: A.fedavg(sgd, aggregator=agg.chain(agg.rotated_quantization(16),
                                                                                  agg.weighted_mean())),
        "fedavg_trimmed_mean": lambda: A.fedavg(sgd, aggregator=agg.trimmed_mean(0.1)),
        "fedavg_median": lambda: A.fedavg(sgd, aggregator=agg.median()),
    }


def run(names: list[str], rounds: int, tiny: bool) -> list[dict]:
    """Trains every algorithm round by round, interleaved (FedAvg, A, B, ..., FedAvg, A, B, ...),
    so each ratio compares rounds run under the same machine load."""
    import jax

    import fedtrain

    module, data, client_lr, _, loss, _, _ = rt.make_task("emnist", tiny)
    clients = {cid: dict(data.get_client(cid)) for cid in data.client_ids}
    rng = np.random.default_rng(1)
    for ex in clients.values():
        ex["domain_id"] = (rng.random(len(ex["y"])) < 0.3).astype(np.int32)
    data = fedtrain.InMemoryFederatedData(clients)
    factories = algorithms(client_lr)
    trainers, times = {}, {}
    for name in names:
        t = fedtrain.FederatedTrainer(module, data, factories[name](), loss=loss, metrics=[], seed=0)
        inner = t._run_round

        def timed(*args, _inner=inner, _name=name):
            t0 = time.perf_counter()
            logs = _inner(*args)  # ends with a device_get of the round's metrics
            times[_name].append(time.perf_counter() - t0)
            return logs

        t._run_round = timed
        trainers[name], times[name] = t, []
    for r in range(rounds):
        for name, t in trainers.items():
            t.fit(rounds=r + 1, clients_per_round=CLIENTS_PER_ROUND, batch_size=rt.BATCH_SIZE, local_epochs=1,
                  verbose=0)
    jax.effects_barrier()
    results = []
    base = float(np.median(times["fedavg"][1:]))
    for name, t in trainers.items():
        steady = times[name][1:]
        res = {"algorithm": name, "first_round_s": times[name][0], "s_per_round": float(np.median(steady)),
               "ratio_to_fedavg": float(np.median(steady)) / base,
               "paired_ratios": [a / b for a, b in zip(steady, times["fedavg"][1:])],
               "compilations": t.engine.compilations, "rounds": rounds, "backend": t.backend}
        for key in ("bits_per_client", "clip_norm"):
            if key in t.history.history:
                res[key] = t.history.history[key][-1]
        results.append(res)
    return results


def table(results: list[dict]) -> str:
    rows = ["| algorithm | first round s | s/round | rounds/s | round time vs FedAvg | target | compilations |",
            "|" + "---|" * 7]
    for r in results:
        target = TARGETS.get(r["algorithm"])
        ok = "" if target is None else (f"<= {target}x " + ("met" if r["ratio_to_fedavg"] <= target else "missed"))
        rows.append(f"| {r['algorithm']} | {r['first_round_s']:.1f} | {r['s_per_round']:.2f} | "
                    f"{1 / r['s_per_round']:.2f} | {r['ratio_to_fedavg']:.2f}x | {ok} | {r['compilations']} |")
    return "\n".join(rows)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", default=None, help="comma-separated (default: all; fedavg always runs)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per algorithm (default 6, quick 3)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="tiny data and model (smoke test)")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                         "algorithms.json"))
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick or args.tiny else 6)
    known = list(algorithms(0.1))
    names = known if args.algorithms is None else [a for a in args.algorithms.split(",") if a]
    unknown = sorted(set(names) - set(known))
    if unknown:
        parser.error(f"unknown algorithms {unknown}; choose from {known}")
    names = ["fedavg"] + [n for n in names if n != "fedavg"]
    results = run(names, rounds, args.tiny)
    report = {"benchmark": "algorithms", "machine": rt.machine(), "tiny": args.tiny, "rounds": rounds,
              "clients_per_round": CLIENTS_PER_ROUND, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": results}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    print(table(results))
    print(f"\nwrote {args.output}")
    return results


if __name__ == "__main__":
    main()
