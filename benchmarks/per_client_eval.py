"""Cost of per-client evaluation relative to a plain evaluation, measured in one run.

Workload: synthetic EMNIST-shaped clients (benchmarks/synthetic.emnist: 28x28x1 images, 62 classes),
FedJAX's EMNIST 2NN (dense, two hidden layers of 200) by default, batch 128. Three evaluations of the
same data, interleaved repeat by repeat so that every ratio compares runs under the same machine load:

  plain        trainer.evaluate(data): pooled loss and accuracy
  per_client   trainer.evaluate(data, per_client=True): per-client totals and their distribution
  personal     trainer.evaluate(data) of an algorithm with personal_params (global model plus the client's
               own stored update), every client holding state: lanes of 8 clients, each on its own model

The first (compiling) call of each is left out; each figure is the median over repeats.

    python benchmarks/per_client_eval.py                      # 1,000 clients, prints a table
    python benchmarks/per_client_eval.py --clients 50 --repeats 2   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "per_client_eval.json")


def personal_fedavg(client_lr: float):
    """FedAvg whose client state is the client's last update and whose personal model adds it back."""
    import jax
    import jax.numpy as jnp
    import optax

    import fedtrain

    base = fedtrain.algorithms.fedavg(optax.sgd(client_lr))

    def client_final(params, local, ctx):
        out = base.client_final(params, local, ctx)
        return out._replace(client_state=jax.tree.map(jnp.negative, out.update))

    return base._replace(name="personal_fedavg", client_final=client_final,
                         client_state_init=lambda p: jax.tree.map(jnp.zeros_like, p),
                         personal_params=lambda s, c: jax.tree.map(jnp.add, s.params, c))


def build(num_clients: int, mean_size: int, model: str, seed: int = 0):
    import jax
    import optax
    from flax import nnx

    import fedtrain
    import synthetic
    from fedtrain.models.emnist import EmnistCNN, EmnistDense

    data = fedtrain.InMemoryFederatedData(synthetic.emnist(num_clients, mean_size, seed=seed))
    module = {"dense": EmnistDense, "cnn": EmnistCNN}[model]
    plain = fedtrain.FederatedTrainer(module(rngs=nnx.Rngs(seed)), data, fedtrain.algorithms.fedavg(optax.sgd(0.01)))
    personal = fedtrain.FederatedTrainer(module(rngs=nnx.Rngs(seed)), data, personal_fedavg(0.01),
                                         client_state_placement="host")
    ids = list(data.client_ids)
    personal.client_states.bind(ids)
    rng = np.random.default_rng(seed)
    leaves = [np.asarray(x) for x in jax.tree.leaves(personal.client_states.initial_state())]
    personal.client_states.load_state_dict(
        {cid: [(0.01 * rng.standard_normal(x.shape)).astype(x.dtype) for x in leaves] for cid in ids})
    return data, plain, personal


def measure(num_clients: int, mean_size: int, model: str, repeats: int, batch_size: int) -> dict:
    data, plain, personal = build(num_clients, mean_size, model)
    runs = {"plain": lambda: plain.evaluate(data, batch_size=batch_size),
            "per_client": lambda: plain.evaluate(data, batch_size=batch_size, per_client=True),
            "personal": lambda: personal.evaluate(data, batch_size=batch_size)}
    first, times, logs = {}, {k: [] for k in runs}, {}
    for name, fn in runs.items():
        t0 = time.perf_counter()
        logs[name] = fn()
        first[name] = time.perf_counter() - t0
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    examples = sum(data.client_size(c) for c in data.client_ids)
    median = {k: float(np.median(v)) for k, v in times.items()}
    return {
        "clients": num_clients, "examples": int(examples), "model": model, "batch_size": batch_size,
        "repeats": repeats, "first_call_s": first, "seconds": times, "median_s": median,
        "examples_per_s": {k: examples / v for k, v in median.items()},
        "ratio_to_plain": {k: v / median["plain"] for k, v in median.items()},
        "pooled_equal": abs(logs["plain"]["loss"] - logs["per_client"]["loss"]) <= 1e-5 * abs(logs["plain"]["loss"]),
        "personalized_clients": logs["personal"].get("personalized_clients"),
    }


def machine() -> dict:
    import jax

    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "jax": jax.__version__, "device": str(jax.devices()[0].device_kind)}


def table(result: dict) -> str:
    lines = [f"{result['clients']} clients, {result['examples']} examples, EMNIST {result['model']}, "
             f"batch {result['batch_size']}, median of {result['repeats']}",
             f"{'evaluation':<12} {'seconds':>8} {'examples/s':>11} {'vs plain':>9} {'first call s':>13}"]
    for name in ("plain", "per_client", "personal"):
        lines.append(f"{name:<12} {result['median_s'][name]:>8.3f} {result['examples_per_s'][name]:>11.0f} "
                     f"{result['ratio_to_plain'][name]:>8.3f}x {result['first_call_s'][name]:>13.2f}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--mean-size", type=int, default=100, help="mean examples per client")
    parser.add_argument("--model", choices=("dense", "cnn"), default="dense")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--output", default=RESULTS)
    args = parser.parse_args(argv)
    if args.clients < 1 or args.repeats < 1 or args.mean_size < 2:
        parser.error("--clients and --repeats must be >= 1, --mean-size >= 2.")
    result = measure(args.clients, args.mean_size, args.model, args.repeats, args.batch_size)
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
