"""Cost of fine-tune-then-evaluate relative to one training round over the same clients, in one run.

Workload: synthetic EMNIST-shaped clients (benchmarks/synthetic.emnist: 28x28x1 images, 62 classes),
FedJAX's EMNIST 2NN (dense, two hidden layers of 200) by default, local batch 20, one local epoch. Two
calls over the same clients, interleaved repeat by repeat so that their ratio compares runs under the
same machine load:

  round       trainer.fit(rounds=1, clients_per_round=<all clients>): one FedAvg round (local training,
              aggregation, server update)
  fine_tune   trainer.fine_tune_evaluate(data): each client fine-tunes the global model for one epoch and
              is evaluated on its own examples before and after (batch 128)

The first (compiling) call of each is left out; each figure is the median over repeats.

    python benchmarks/fine_tune_eval.py                             # 1,000 clients, prints a table
    python benchmarks/fine_tune_eval.py --clients 50 --repeats 1    # smoke test
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

from per_client_eval import machine

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "fine_tune_eval.json")


def measure(num_clients: int, mean_size: int, model: str, repeats: int, batch_size: int, lanes: int) -> dict:
    import optax
    from flax import nnx

    import fedtrain
    import synthetic
    from fedtrain.models.emnist import EmnistCNN, EmnistDense

    data = fedtrain.InMemoryFederatedData(synthetic.emnist(num_clients, mean_size, seed=0))
    module = {"dense": EmnistDense, "cnn": EmnistCNN}[model]
    trainer = fedtrain.FederatedTrainer(module(rngs=nnx.Rngs(0)), data, fedtrain.algorithms.fedavg(optax.sgd(0.01)))
    tx = optax.sgd(0.01)  # one optimizer object: repeated calls reuse the compiled blocks
    runs = {
        "round": lambda: trainer.fit(rounds=trainer.round + 1, initial_round=trainer.round,
                                     clients_per_round=num_clients, batch_size=batch_size, verbose=0),
        "fine_tune": lambda: trainer.fine_tune_evaluate(data, client_optimizer=tx,
                                                        batch_size=batch_size, local_epochs=1, lanes=lanes),
    }
    first, times, out = {}, {k: [] for k in runs}, {}
    for name, fn in runs.items():
        t0 = time.perf_counter()
        out[name] = fn()
        first[name] = time.perf_counter() - t0
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    median = {k: float(np.median(v)) for k, v in times.items()}
    examples = int(sum(data.client_size(c) for c in data.client_ids))
    ft = out["fine_tune"]
    return {"clients": num_clients, "examples": examples, "model": model, "batch_size": batch_size, "lanes": lanes,
            "repeats": repeats, "first_call_s": first, "seconds": times, "median_s": median,
            "ratio_to_round": median["fine_tune"] / median["round"], "compiles": ft.compiles,
            "fine_tuned_clients": len(ft.after), "accuracy_before": ft.summary_before.get("accuracy"),
            "accuracy_after": ft.summary_after.get("accuracy")}


def table(result: dict) -> str:
    lines = [f"{result['clients']} clients, {result['examples']} examples, EMNIST {result['model']}, "
             f"batch {result['batch_size']}, one local epoch, {result['lanes']} lanes, median of {result['repeats']}",
             f"{'call':<10} {'seconds':>8} {'vs round':>9} {'first call s':>13}"]
    for name in ("round", "fine_tune"):
        ratio = result["median_s"][name] / result["median_s"]["round"]
        lines.append(f"{name:<10} {result['median_s'][name]:>8.3f} {ratio:>8.3f}x {result['first_call_s'][name]:>13.2f}")
    lines.append(f"fine-tune blocks compiled: {result['compiles']}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--mean-size", type=int, default=100, help="mean examples per client")
    parser.add_argument("--model", choices=("dense", "cnn"), default="dense")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--lanes", type=int, default=8)
    parser.add_argument("--output", default=RESULTS)
    args = parser.parse_args(argv)
    if args.clients < 1 or args.repeats < 1 or args.mean_size < 2 or args.lanes < 1:
        parser.error("--clients, --repeats and --lanes must be >= 1, --mean-size >= 2.")
    result = measure(args.clients, args.mean_size, args.model, args.repeats, args.batch_size, args.lanes)
    result["machine"] = machine()
    print(table(result))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
