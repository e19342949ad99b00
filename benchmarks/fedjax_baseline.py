"""FedJAX 0.0.17 FedAvg round throughput on the suite's data; runs inside the FedJAX virtualenv.

Create the virtualenv with ``benchmarks/fedjax_env.sh``; ``benchmarks/suite.py``
calls this script with the data, cohorts and flags of each workload. It prints
one ``RESULT {json}`` line with the keys of ``round_throughput._summary``
(first_round_s, s_per_round, examples_per_s, padding_efficiency, compilations,
peak_rss_mb, rounds, backend) plus the data's fingerprint.

Models: ``fedjax.models.emnist.create_conv_model``,
``fedjax.models.shakespeare.create_lstm_model``,
``fedjax.models.stackoverflow.create_lstm_model``. The round is
``fedjax.algorithms.fed_avg.federated_averaging(...).apply`` with FedJAX's
default (jit) ``for_each_client`` backend; clients are shuffled and batched by
``ShuffleRepeatBatchHParams(batch_size, num_epochs=1)``.

    python benchmarks/fedjax_baseline.py --task emnist --clients-per-round 10 --rounds 4
    python benchmarks/fedjax_baseline.py --task shakespeare --data shakespeare.npz --cohorts cohorts.json \\
        --client-lr 0.0316 --server sgd --server-lr 1 --batch-size 10 --hidden-size 256
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np

import synthetic  # numpy only; shared with the fedtrain side

# FedJAX's tuned flags (experiments/fed_avg/*.flags), used when not given on the command line.
DEFAULT_FLAGS = {
    "emnist": dict(client_lr=0.001, server="adam", server_lr=1.0, b1=0.9, b2=0.99, eps=0.01, batch_size=10),
    "shakespeare": dict(client_lr=0.0316, server="sgd", server_lr=1.0, batch_size=10),
    "stackoverflow": dict(client_lr=0.5, server="adam", server_lr=0.02, b1=0.9, b2=0.999, eps=1e-8, batch_size=16),
}


def make_model(task: str, args):
    from fedjax.models import emnist, shakespeare, stackoverflow
    if task == "emnist":
        return emnist.create_conv_model(only_digits=False)
    if task == "shakespeare":
        return shakespeare.create_lstm_model(embed_size=8, lstm_hidden_size=args.hidden_size or 256)
    if task == "stackoverflow":
        return stackoverflow.create_lstm_model(vocab_size=args.vocab_size, embed_size=args.embed_size or 96,
                                               lstm_hidden_size=args.hidden_size or 670)
    raise ValueError(f"FedJAX has no model for task {task!r}")


def make_server_optimizer(name: str, lr: float, b1: float, b2: float, eps: float):
    from fedjax.core import optimizers
    if name == "sgd":
        return optimizers.sgd(lr)
    if name == "adam":
        return optimizers.adam(lr, b1=b1, b2=b2, eps=eps)
    if name == "yogi":
        return optimizers.yogi(lr, b1=b1, b2=b2, eps=eps)
    raise ValueError(f"unknown server optimizer {name!r}")


def load_clients(args) -> dict:
    if args.data:
        return synthetic.load_npz(args.data)
    if args.task not in synthetic.GENERATORS:
        raise SystemExit(f"--data is required for task {args.task!r}")
    return synthetic.generate(args.task, **json.loads(args.generator_kwargs or "{}"))


def uniform_cohort(seed: int, round_index: int, population: int, k: int) -> list[int]:
    """Same draw as ``fedtrain.samplers.UniformSampler``."""
    return [int(i) for i in np.random.default_rng([seed, round_index, 0x5A]).choice(population, size=k,
                                                                                     replace=False)]


class CompileCounter:
    """Counts XLA backend compilations through ``jax.monitoring`` (None if the event is unavailable)."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count = 0
        self.available = False
        try:
            from jax._src import monitoring
            monitoring.register_event_duration_secs_listener(self._on_event)
            self.available = True
        except (ImportError, AttributeError):
            pass

    def _on_event(self, event, duration, **kwargs):
        if event == self.EVENT:
            self.count += 1

    def value(self):
        return self.count if self.available and self.count else None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", required=True, choices=sorted(DEFAULT_FLAGS))
    parser.add_argument("--clients-per-round", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--data", help="clients as written by synthetic.save_npz (else generated from a seed)")
    parser.add_argument("--generator-kwargs", help="JSON kwargs of synthetic.GENERATORS[task] (without --data)")
    parser.add_argument("--cohorts", help="JSON list of population indices per round (else uniform, seed 0)")
    parser.add_argument("--expect-fingerprint", help="fail unless the data has this synthetic.fingerprint")
    parser.add_argument("--client-lr", type=float)
    parser.add_argument("--server", choices=["sgd", "adam", "yogi"])
    parser.add_argument("--server-lr", type=float)
    parser.add_argument("--b1", type=float)
    parser.add_argument("--b2", type=float)
    parser.add_argument("--eps", type=float)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--hidden-size", type=int, help="LSTM size (default: the task's)")
    parser.add_argument("--embed-size", type=int, help="Stack Overflow embedding size (default 96)")
    parser.add_argument("--vocab-size", type=int, default=10_000, help="Stack Overflow vocabulary (words)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    flags = {"b1": 0.9, "b2": 0.999, "eps": 1e-8, **DEFAULT_FLAGS[args.task]}
    for key in ("client_lr", "server", "server_lr", "b1", "b2", "eps", "batch_size"):
        if getattr(args, key) is not None:
            flags[key] = getattr(args, key)

    clients = load_clients(args)
    fingerprint = synthetic.fingerprint(clients)
    if args.expect_fingerprint and fingerprint != args.expect_fingerprint:
        raise SystemExit(f"data fingerprint {fingerprint} != expected {args.expect_fingerprint}: "
                         "the two sides would not train on the same data")
    ids = list(clients)
    if args.cohorts:
        with open(args.cohorts) as f:
            cohorts = json.load(f)[:args.rounds]
        if len(cohorts) < args.rounds:
            raise SystemExit(f"{args.cohorts} has {len(cohorts)} cohorts, {args.rounds} rounds asked")
    else:
        cohorts = [uniform_cohort(args.seed, r, len(ids), args.clients_per_round) for r in range(args.rounds)]

    counter = CompileCounter()
    import jax
    import fedjax
    from fedjax.algorithms import fed_avg

    model = make_model(args.task, args)
    algorithm = fed_avg.federated_averaging(
        grad_fn=fedjax.model_grad(model),
        client_optimizer=fedjax.optimizers.sgd(flags["client_lr"]),
        server_optimizer=make_server_optimizer(flags["server"], flags["server_lr"], flags["b1"], flags["b2"],
                                               flags["eps"]),
        client_batch_hparams=fedjax.ShuffleRepeatBatchHParams(batch_size=flags["batch_size"], num_epochs=1))
    datasets = {cid: fedjax.ClientDataset(clients[cid]) for cid in ids}
    state = algorithm.init(model.init(jax.random.PRNGKey(args.seed)))
    jax.block_until_ready(state.params)
    compiles_before = counter.count

    times, examples = [], []
    key = jax.random.PRNGKey(args.seed + 1)
    for r, cohort in enumerate(cohorts):
        round_key = jax.random.fold_in(key, r)
        batch = [(ids[i].encode(), datasets[ids[i]], jax.random.fold_in(round_key, j)) for j, i in enumerate(cohort)]
        start = time.perf_counter()
        state, _ = algorithm.apply(state, batch)
        jax.block_until_ready(state.params)
        times.append(time.perf_counter() - start)
        examples.append(sum(len(datasets[ids[i]]) for i in cohort))
        print(f"round {r}: {times[-1]:.2f} s, {examples[-1]} examples", file=sys.stderr, flush=True)

    steady = times[1:] if len(times) > 1 else times
    steady_examples = examples[1:] if len(examples) > 1 else examples
    compilations = counter.count - compiles_before if counter.available else None
    result = {
        "first_round_s": float(times[0]),
        "s_per_round": float(statistics.median(steady)),
        "examples_per_s": float(sum(steady_examples) / sum(steady)),
        "padding_efficiency": None,
        "compilations": compilations,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rounds": len(times),
        "backend": f"fedjax {_version('fedjax')} jit (jax {jax.__version__})",
        "fingerprint": fingerprint,
        "flags": flags,
    }
    print("RESULT " + json.dumps(result), flush=True)
    return result


def _version(package: str) -> str:
    from importlib.metadata import version
    return version(package)


if __name__ == "__main__":
    main()
