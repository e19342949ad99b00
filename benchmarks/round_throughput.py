"""Round throughput of fedtrain against a plain-JAX reference, measured in one run.

Workloads (FedJAX's flags):
  emnist-10/50/100  EMNIST CNN (1.2M params, 62 classes) on synthetic EMNIST-shaped data,
                    500 clients of ~194 examples; client SGD lr 0.001, batch 10, 1 epoch;
                    server Adam lr 1.0, b2 0.99, eps 0.01; 10/50/100 clients per round.
  shakespeare-10    2x LSTM-256 on the offline federated Shakespeare (1,154 clients, 80-char
                    sequences); client SGD lr 0.0316, batch 10, 1 epoch; server SGD lr 1.

The reference is what one writes by hand in plain JAX: one jitted round that scans over the
cohort's clients and, inside, over each client's batches (padded to the population's largest
client, padded steps skipped with ``lax.cond``), then averages and applies the server optimizer.
Both sides train the same clients (same sampler) with the same model code. Each measurement
runs in its own process (clean peak RSS, cold compile).

    python benchmarks/round_throughput.py                 # all workloads, prints a table
    python benchmarks/round_throughput.py --quick         # fewer rounds
    python benchmarks/round_throughput.py --workloads emnist-10 --output results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np

WORKLOADS = {
    "emnist-10": dict(task="emnist", clients_per_round=10, rounds=8, quick_rounds=4),
    "emnist-50": dict(task="emnist", clients_per_round=50, rounds=4, quick_rounds=3),
    "emnist-100": dict(task="emnist", clients_per_round=100, rounds=3, quick_rounds=2),
    "shakespeare-10": dict(task="shakespeare", clients_per_round=10, rounds=6, quick_rounds=3),
}
BATCH_SIZE = 10
# More tasks (e.g. from benchmarks/suite.py): name -> fn(tiny) returning make_task's tuple, and their
# client batch sizes (default BATCH_SIZE).
TASKS: dict = {}
TASK_BATCH_SIZE: dict[str, int] = {}


# ---------------------------------------------------------------------------- tasks
def synthetic_emnist(num_clients: int, mean_size: int, num_classes: int, seed: int = 0):
    import fedtrain
    rng = np.random.default_rng(seed)
    sizes = rng.integers(mean_size // 2, 3 * mean_size // 2 + 1, num_clients)
    clients = {f"writer_{i:04d}": {"x": rng.random((n, 28, 28, 1), np.float32),
                                   "y": rng.integers(0, num_classes, n).astype(np.int32)}
               for i, n in enumerate(sizes)}
    return fedtrain.InMemoryFederatedData(clients)


def make_task(task: str, tiny: bool):
    """(nnx module, train data, client lr, server optimizer factory kwargs, loss, metrics)."""
    import optax
    from flax import nnx

    import fedtrain
    if task in TASKS:
        return TASKS[task](tiny)
    if task == "emnist":
        from fedtrain.models.emnist import EmnistCNN
        num_classes = 62
        data = synthetic_emnist(120 if tiny else 500, 24 if tiny else 194, num_classes)
        module = EmnistCNN(num_classes=num_classes, rngs=nnx.Rngs(0))
        server_tx = optax.adam(1.0, b1=0.9, b2=0.99, eps=0.01)
        return module, data, 0.001, server_tx, fedtrain.metrics.get("sparse_categorical_crossentropy"), "x", "y"
    if task == "shakespeare":
        from fedtrain.datasets import shakespeare
        from fedtrain.models.shakespeare import ShakespeareLSTM
        data = shakespeare.load_data("train")
        if tiny:
            data = data.subset(data.client_ids[:120])
        module = ShakespeareLSTM(hidden_size=32 if tiny else 256, rngs=nnx.Rngs(0))
        loss = fedtrain.metrics.sequence_crossentropy(pad_id=shakespeare.PAD)
        return module, data, 0.0316, optax.sgd(1.0), loss, "x", "y"
    raise ValueError(f"unknown task {task!r}")


# ---------------------------------------------------------------------------- fedtrain
def run_fedtrain(task: str, clients_per_round: int, rounds: int, tiny: bool) -> dict:
    import jax
    import optax

    import fedtrain
    from fedtrain.callbacks import Callback

    module, data, client_lr, server_tx, loss, _, _ = make_task(task, tiny)
    algorithm = fedtrain.algorithms.fedopt(optax.sgd(client_lr), server_tx)
    trainer = fedtrain.FederatedTrainer(module, data, algorithm, loss=loss, metrics=[], seed=0)

    class Timer(Callback):
        def __init__(self):
            self.ends, self.examples, self.padding, self.waits = [], [], [], []

        def on_round_end(self, r, logs=None):
            self.ends.append(time.perf_counter())
            self.examples.append(logs["num_examples"])
            self.padding.append(trainer.last_round_info["padding_efficiency"])
            self.waits.append(trainer.last_round_info["input_wait_s"])

    timer = Timer()
    start = time.perf_counter()
    trainer.fit(rounds=rounds, clients_per_round=clients_per_round,
                batch_size=TASK_BATCH_SIZE.get(task, BATCH_SIZE), local_epochs=1,
                callbacks=[timer], verbose=0)
    times = np.diff([start] + timer.ends)
    summary = _summary(times, timer.examples, float(np.mean(timer.padding)), trainer.engine.compilations,
                       backend=trainer.backend)
    # Fraction of steady-state round time the device waited for input (host work not hidden).
    summary["input_wait_fraction"] = float(sum(timer.waits[1:]) / max(sum(times[1:]), 1e-9))
    summary["devices"] = len(jax.devices())
    return summary


# ---------------------------------------------------------------------------- reference
def run_reference(task: str, clients_per_round: int, rounds: int, tiny: bool) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from fedtrain.samplers import UniformSampler

    module, data, client_lr, server_tx, loss, x_key, y_key = make_task(task, tiny)
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    client_tx = optax.sgd(client_lr)
    ids = list(data.client_ids)
    sizes = np.array([data.client_size(c) for c in ids])
    batch_size = TASK_BATCH_SIZE.get(task, BATCH_SIZE)
    max_steps = int(-(-sizes.max() // batch_size))

    def loss_fn(p, batch, mask, key):
        model = nnx.merge(graphdef, p, jax.tree.map(jnp.asarray, rest))
        nnx.reseed(model, dropout=key) if _has_dropout(rest) else None
        model.train()
        logits = model(batch[x_key])
        values, weights = loss.fn(batch, logits)
        weights = weights * mask.reshape(mask.shape + (1,) * (weights.ndim - 1))
        return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)

    def client_update(server_params, batches, masks, valid, key):
        def step(carry, inputs):
            p, opt = carry
            batch, mask, ok, k = inputs

            def train(c):
                g = jax.grad(loss_fn)(c[0], batch, mask, k)
                updates, new_opt = client_tx.update(g, c[1], c[0])
                return optax.apply_updates(c[0], updates), new_opt
            return jax.lax.cond(ok, train, lambda c: c, (p, opt)), None
        keys = jax.random.split(key, valid.shape[0])
        (p, _), _ = jax.lax.scan(step, (server_params, client_tx.init(server_params)), (batches, masks, valid, keys))
        return jax.tree.map(jnp.subtract, server_params, p)

    @jax.jit
    def reference_round(server_params, server_opt, batches, masks, valid, weights, key):
        def client(total, inputs):
            b, m, v, w, k = inputs
            delta = client_update(server_params, b, m, v, k)
            return jax.tree.map(lambda t, d: t + w * d, total, delta), None
        zeros = jax.tree.map(jnp.zeros_like, server_params)
        keys = jax.random.split(key, weights.shape[0])
        total, _ = jax.lax.scan(client, zeros, (batches, masks, valid, weights, keys))
        mean_delta = jax.tree.map(lambda t: t / jnp.sum(weights), total)
        updates, server_opt = server_tx.update(mean_delta, server_opt, server_params)
        return optax.apply_updates(server_params, updates), server_opt

    def cohort_arrays(r):
        chosen = UniformSampler().sample(0, r, len(ids), clients_per_round)
        rng = np.random.default_rng([0, r])
        feats = {}
        masks = np.zeros((clients_per_round, max_steps, batch_size), np.float32)
        for i, c in enumerate(chosen):
            ex = data.get_client(ids[c])
            n = sizes[c]
            order = rng.permutation(n)
            for key, value in ex.items():
                buf = feats.setdefault(key, np.zeros((clients_per_round, max_steps * batch_size) + value.shape[1:],
                                                     value.dtype))
                buf[i, :n] = value[order]
            masks[i].reshape(-1)[:n] = 1.0
        batches = {k: v.reshape((clients_per_round, max_steps, batch_size) + v.shape[2:]) for k, v in feats.items()}
        valid = masks.max(axis=2) > 0
        weights = sizes[chosen].astype(np.float32)
        return batches, masks, valid, weights, int(sizes[chosen].sum())

    server_opt = server_tx.init(params)
    key = jax.random.key(0)
    start = time.perf_counter()
    ends, examples = [], []
    for r in range(rounds):
        batches, masks, valid, weights, n = cohort_arrays(r)
        params, server_opt = reference_round(params, server_opt, batches, masks, valid, weights,
                                             jax.random.fold_in(key, r))
        jax.block_until_ready(params)
        ends.append(time.perf_counter())
        examples.append(n)
    times = np.diff([start] + ends)
    return _summary(times, examples, None, reference_round._cache_size(), backend="plain-jax scan")


def _has_dropout(rest) -> bool:
    import jax
    from flax import nnx
    leaves = jax.tree.leaves(rest, is_leaf=lambda v: isinstance(v, nnx.Variable))
    return any(getattr(v, "tag", None) == "dropout" for v in leaves)


def _summary(times, examples, padding, compilations, backend) -> dict:
    steady = times[1:] if len(times) > 1 else times
    steady_examples = examples[1:] if len(examples) > 1 else examples
    return {
        "first_round_s": float(times[0]),
        "s_per_round": float(statistics.median(steady)),
        "examples_per_s": float(sum(steady_examples) / sum(steady)),
        "padding_efficiency": padding,
        "compilations": int(compilations),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rounds": len(times),
        "backend": backend,
    }


# ---------------------------------------------------------------------------- driver
def _worker(args) -> None:
    runner = {"fedtrain": run_fedtrain, "reference": run_reference}[args.impl]
    spec = WORKLOADS[args.workload]
    result = runner(spec["task"], spec["clients_per_round"], args.rounds, args.tiny)
    print("RESULT " + json.dumps(result))


def measure(workload: str, impl: str, rounds: int, tiny: bool, script: str | None = None,
            devices: int | None = None) -> dict:
    """Runs one measurement in a fresh process (``script --worker``, this file by default); with
    ``devices``, the process sees that many CPU devices (and fedtrain picks its sharded backend)."""
    cmd = [sys.executable, script or os.path.abspath(__file__), "--worker", "--workload", workload, "--impl", impl,
           "--rounds", str(rounds)] + (["--tiny"] if tiny else [])
    env = dict(os.environ)
    if devices:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{impl} on {workload} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def machine() -> dict:
    import jax
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "jax": jax.__version__, "device": str(jax.devices()[0].device_kind)}


def table(results: list[dict]) -> str:
    head = ("| workload | impl | first round s | s/round | examples/s | vs reference | padding eff. | "
            "input wait | compilations | peak RSS MB |")
    rows = [head, "|" + "---|" * 10]
    for res in results:
        unit = "seq/s" if res["workload"].startswith("shakespeare") else "ex/s"
        ratio = res.get("ratio_to_reference")
        pad = res["padding_efficiency"]
        rows.append(f"| {res['workload']} | {res['impl']} | {res['first_round_s']:.1f} | {res['s_per_round']:.2f} | "
                    f"{res['examples_per_s']:.0f} {unit} | {'' if ratio is None else f'{ratio:.2f}x'} | "
                    f"{'' if pad is None else f'{pad:.3f}'} | {_percent(res.get('input_wait_fraction'))} | "
                    f"{res['compilations']} | {res['peak_rss_mb']:.0f} |")
    return "\n".join(rows)


def _percent(value) -> str:
    return "" if value is None else f"{100 * value:.1f} %"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--quick", action="store_true", help="fewer rounds per workload")
    parser.add_argument("--tiny", action="store_true", help="tiny data and models (smoke test)")
    parser.add_argument("--rounds", type=int, help="rounds per measurement (default per workload)")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--devices", type=int, default=0,
                        help="also run fedtrain on this many (forced) CPU devices, sharded; ratio vs one device")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                         "round_throughput.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return []
    names = [w for w in args.workloads.split(",") if w]
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workloads {unknown}; choose from {list(WORKLOADS)}")
    results = []
    for name in names:
        spec = WORKLOADS[name]
        rounds = args.rounds or (spec["quick_rounds"] if args.quick or args.tiny else spec["rounds"])
        ours = {"workload": name, "impl": "fedtrain", **measure(name, "fedtrain", rounds, args.tiny)}
        results.append(ours)
        if args.devices > 1:
            many = {"workload": name, "impl": f"fedtrain, {args.devices} devices",
                    **measure(name, "fedtrain", rounds, args.tiny, devices=args.devices)}
            many["ratio_to_one_device"] = many["examples_per_s"] / ours["examples_per_s"]
            results.append(many)
        if not args.no_reference:
            ref = {"workload": name, "impl": "plain JAX", **measure(name, "reference", rounds, args.tiny)}
            ours["ratio_to_reference"] = ours["examples_per_s"] / ref["examples_per_s"]
            results.append(ref)
        print(table([r for r in results if r["workload"] == name]).split("\n", 2)[-1], flush=True)
    report = {"benchmark": "round_throughput", "machine": machine(), "tiny": args.tiny,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": results}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    print()
    print(table(results))
    print(f"\nwrote {args.output}")
    return results


if __name__ == "__main__":
    main()
