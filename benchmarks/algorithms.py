"""Round time of every algorithm relative to FedAvg on the same workload, measured in one run.

Workload: round_throughput's EMNIST task (FedJAX's EMNIST CNN on synthetic EMNIST-shaped data,
500 clients of ~194 examples, client SGD lr 0.001, batch 10, 1 epoch), 10 clients per round, with
a ``domain_id`` feature (two domains) added to every example so that every algorithm, Agnostic
FedAvg included, trains on the same data. Each algorithm runs in its own process.

Targets from the issue: SCAFFOLD and MimeLite within 1.3x of FedAvg's round time, DP-FedAvg within 1.2x.

    python benchmarks/algorithms.py                  # all algorithms, prints a table
    python benchmarks/algorithms.py --tiny --quick   # smoke test
    python benchmarks/algorithms.py --algorithms fedavg,scaffold --rounds 6
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np
import round_throughput as rt

CLIENTS_PER_ROUND = 10
TARGETS = {"scaffold": 1.3, "mime_lite": 1.3, "dp_fedavg": 1.2, "dp_fedavg_adaptive": 1.2}


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
        "mime": lambda: A.mime(optax.sgd(client_lr, momentum=0.9)),
        "agnostic_fedavg": lambda: A.agnostic_fedavg(sgd, [0.5, 0.5], domain_learning_rate=0.1),
        "hypcluster": lambda: A.hypcluster(sgd, 2),
        "dp_fedavg": lambda: A.dp_fedavg(sgd, 1.0, 0.1, CLIENTS_PER_ROUND),
        "dp_fedavg_adaptive": lambda: A.dp_fedavg(sgd, 1.0, 0.1, CLIENTS_PER_ROUND, adaptive_clipping=True),
        "fedavg_uniform_quantization": lambda: A.fedavg(sgd, aggregator=agg.chain(agg.uniform_quantization(16),
                                                                                  agg.weighted_mean())),
        "fedavg_rotated_quantization": lambda: A.fedavg(sgd, aggregator=agg.chain(agg.rotated_quantization(16),
                                                                                  agg.weighted_mean())),
    }


def run_algorithm(name: str, rounds: int, tiny: bool) -> dict:
    import fedtrain
    from fedtrain.callbacks import Callback

    module, data, client_lr, _, loss, _, _ = rt.make_task("emnist", tiny)
    clients = {cid: dict(data.get_client(cid)) for cid in data.client_ids}
    rng = np.random.default_rng(1)
    for ex in clients.values():
        ex["domain_id"] = (rng.random(len(ex["y"])) < 0.3).astype(np.int32)
    data = fedtrain.InMemoryFederatedData(clients)
    trainer = fedtrain.FederatedTrainer(module, data, algorithms(client_lr)[name](), loss=loss, metrics=[], seed=0)

    class Timer(Callback):
        def __init__(self):
            self.ends, self.examples, self.padding = [], [], []

        def on_round_end(self, r, logs=None):
            self.ends.append(time.perf_counter())
            self.examples.append(logs["num_examples"])
            self.padding.append(trainer.last_round_info["padding_efficiency"])

    timer = Timer()
    start = time.perf_counter()
    trainer.fit(rounds=rounds, clients_per_round=CLIENTS_PER_ROUND, batch_size=rt.BATCH_SIZE, local_epochs=1,
                callbacks=[timer], verbose=0)
    times = np.diff([start] + timer.ends)
    extras = {k: v[-1] for k, v in trainer.history.history.items() if k in ("bits_per_client", "clip_norm")}
    return {**rt._summary(times, timer.examples, float(np.mean(timer.padding)), trainer.engine.compilations,
                          backend=trainer.backend), **extras}


def measure(name: str, rounds: int, tiny: bool) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--rounds", str(rounds)] + (
        ["--tiny"] if tiny else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


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
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick or args.tiny else 6)
    if args.worker:
        print("RESULT " + json.dumps(run_algorithm(args.worker, rounds, args.tiny)))
        return []
    names = list(algorithms(0.1)) if args.algorithms is None else [a for a in args.algorithms.split(",") if a]
    unknown = sorted(set(names) - set(algorithms(0.1)))
    if unknown:
        parser.error(f"unknown algorithms {unknown}; choose from {list(algorithms(0.1))}")
    names = ["fedavg"] + [n for n in names if n != "fedavg"]
    results = []
    for name in names:
        res = {"algorithm": name, **measure(name, rounds, args.tiny)}
        res["ratio_to_fedavg"] = res["s_per_round"] / results[0]["s_per_round"] if results else 1.0
        results.append(res)
        print(table([res]).split("\n", 2)[-1], flush=True)
    report = {"benchmark": "algorithms", "machine": rt.machine(), "tiny": args.tiny, "rounds": rounds,
              "clients_per_round": CLIENTS_PER_ROUND, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": results}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    print()
    print(table(results))
    print(f"\nwrote {args.output}")
    return results


if __name__ == "__main__":
    main()
