"""Useful lane-steps of the vmap backend: how much of the compiled loops' work is real client steps.

Under ``backend="vmap"`` a round runs ``lanes`` lanes side by side, each a scan over ``slots``
clients; lanes wait for each other slot by slot, so a lane whose client has fewer steps idles
until the slot's largest client is done. ``useful lane-steps`` = real client steps / lane-steps
executed. It depends only on the round's plan (cohort sizes, lanes, slots), not on the model,
so the workloads run with the real client-size distributions but tiny models (fast on a CPU):

  emnist-10 / emnist-100  500 synthetic EMNIST clients, sizes uniform in [97, 291] (benchmarks/
                          synthetic.py, as round_throughput.py), batch 10; multinomial logistic
                          regression (fedtrain.models.emnist.EmnistLogistic) on the 28x28x1 images.
  stackoverflow-50        2,000 synthetic Stack Overflow clients of 20-token sentences, log-normal
                          sizes (median 80, sigma 1.4, capped at 1,000; benchmarks/synthetic.py),
                          batch 16; an embedding-8 -> dense next-word model over a 200-word
                          vocabulary (sizes and shapes as the real task; only the ids' range shrinks).

Each workload runs twice: with the engine's choice of lanes (``lanes=None``; target: useful
lane-steps >= 0.85, PASS/FAIL) and, for comparison, with one client per lane
(``lanes=clients_per_round``). Figures are averaged over the rounds (5; 3 with ``--quick``);
``expected`` is the estimate the engine's choice is based on (plan.choose_lanes: the mean over 16
cohorts it samples itself).

    python benchmarks/lane_steps.py                 # prints the table, writes results/lane_steps.json
    python benchmarks/lane_steps.py --quick         # 3 rounds per run
    python benchmarks/lane_steps.py --workloads emnist-10 --rounds 10 --output /tmp/lane_steps.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np

import synthetic

TARGET = 0.85
SO_VOCAB = 200  # ids 0 .. SO_VOCAB + 3 (PAD, BOS, EOS, words, one OOV id)
WORKLOADS = {
    "emnist-10": dict(task="emnist", clients_per_round=10, batch_size=10),
    "emnist-100": dict(task="emnist", clients_per_round=100, batch_size=10),
    "stackoverflow-50": dict(task="stackoverflow", clients_per_round=50, batch_size=16),
}


def make_data(task: str):
    import fedtrain
    if task == "emnist":
        return fedtrain.InMemoryFederatedData(synthetic.emnist(num_clients=500, mean_size=194))
    if task == "stackoverflow":
        return fedtrain.InMemoryFederatedData(synthetic.stackoverflow(
            num_clients=2000, vocab_size=SO_VOCAB, median_size=80, max_size=1000))
    raise ValueError(f"unknown task {task!r}")


def make_model(task: str):
    """(tiny nnx module, loss) on the task's feature shapes."""
    from flax import nnx

    import fedtrain
    if task == "emnist":
        from fedtrain.models.emnist import EmnistLogistic
        return EmnistLogistic(62, rngs=nnx.Rngs(0)), fedtrain.metrics.get("sparse_categorical_crossentropy")

    class TinyNextWord(nnx.Module):
        """ids ``[B, T]`` -> logits ``[B, T, V]``: an embedding and one dense layer."""

        def __init__(self, vocab: int, width: int = 8, *, rngs: nnx.Rngs):
            self.embed = nnx.Embed(vocab, width, rngs=rngs)
            self.dense = nnx.Linear(width, vocab, rngs=rngs)

        def __call__(self, x):
            return self.dense(self.embed(x))

    return (TinyNextWord(SO_VOCAB + 4, rngs=nnx.Rngs(0)),
            fedtrain.metrics.sequence_crossentropy(pad_id=synthetic.PAD))


def expected_efficiency(data, batch_size: int, clients_per_round: int, lanes: int) -> float:
    """What plan.choose_lanes estimates for ``lanes``: the mean lockstep efficiency over the same 16
    cohorts it samples (seed 0)."""
    from fedtrain.engine.plan import BatchSpec, lockstep_efficiency
    steps = BatchSpec(batch_size).steps(np.array([data.client_size(c) for c in data.client_ids]))
    steps = steps[steps > 0]
    k = min(clients_per_round, len(steps))
    rng = np.random.default_rng(0)
    cohorts = [steps[rng.choice(len(steps), k, replace=False)] for _ in range(16)]
    return float(np.mean([lockstep_efficiency(c, min(lanes, k)) for c in cohorts]))


def measure(name: str, data, lanes: int | None, rounds: int) -> dict:
    import optax

    import fedtrain
    from fedtrain.callbacks import Callback

    spec = WORKLOADS[name]
    module, loss = make_model(spec["task"])
    trainer = fedtrain.FederatedTrainer(module, data, fedtrain.algorithms.fedavg(optax.sgd(0.01)), loss=loss,
                                        metrics=[], backend="vmap", lanes=lanes, seed=0)
    infos = []

    class Record(Callback):
        def on_round_end(self, r, logs=None):
            infos.append(dict(trainer.last_round_info))

    start = time.perf_counter()
    trainer.fit(rounds=rounds, clients_per_round=spec["clients_per_round"], batch_size=spec["batch_size"],
                local_epochs=1, callbacks=[Record()], verbose=0)
    useful = [float(i["useful_lane_steps"]) for i in infos]
    last = infos[-1]
    return {
        "workload": name,
        "lanes_mode": "engine (lanes=None)" if lanes is None else f"one client per lane (lanes={lanes})",
        "lanes": int(last["lanes"]), "slots": int(last["slots"]), "capacity": int(last["capacity"]),
        "layouts": sorted({(int(i["lanes"]), int(i["slots"]), int(i["capacity"])) for i in infos}),
        "useful_lane_steps": float(np.mean(useful)),
        "useful_lane_steps_per_round": useful,
        "padding_efficiency": float(np.mean([i["padding_efficiency"] for i in infos])),
        "expected": expected_efficiency(data, spec["batch_size"], spec["clients_per_round"], int(last["lanes"])),
        "compilations": int(last["compilations"]),
        "rounds": len(infos),
        "seconds": time.perf_counter() - start,
        "pass": None if lanes is not None else bool(np.mean(useful) >= TARGET),
    }


def table(results: list[dict]) -> str:
    head = ("| workload | lanes chosen by | lanes | slots | capacity | useful lane-steps (min-max) | expected | "
            "padding eff. | compilations | check |")
    rows = [head, "|" + "---|" * 10]
    for r in results:
        per = r["useful_lane_steps_per_round"]
        check = "comparison" if r["pass"] is None else ("PASS" if r["pass"] else "FAIL")
        rows.append(f"| {r['workload']} | {r['lanes_mode']} | {r['lanes']} | {r['slots']} | {r['capacity']} | "
                    f"{r['useful_lane_steps']:.3f} ({min(per):.3f}-{max(per):.3f}) | {r['expected']:.3f} | "
                    f"{r['padding_efficiency']:.3f} | {r['compilations']} | {check} |")
    return "\n".join(rows)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--quick", action="store_true", help="3 rounds per run instead of 5")
    parser.add_argument("--rounds", type=int, help="rounds per run (default 5, 3 with --quick)")
    parser.add_argument("--no-comparison", action="store_true", help="skip the one-client-per-lane runs")
    parser.add_argument("--output", default=os.path.join(HERE, "results", "lane_steps.json"))
    args = parser.parse_args(argv)
    names = [w for w in args.workloads.split(",") if w]
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workloads {unknown}; choose from {list(WORKLOADS)}")
    rounds = args.rounds or (3 if args.quick else 5)

    import jax
    results, data_cache = [], {}
    for name in names:
        spec = WORKLOADS[name]
        if spec["task"] not in data_cache:
            data_cache.clear()  # one population in memory at a time
            data_cache[spec["task"]] = make_data(spec["task"])
        data = data_cache[spec["task"]]
        modes = [None] + ([] if args.no_comparison else [spec["clients_per_round"]])
        rows = [measure(name, data, lanes, rounds) for lanes in modes]
        results.extend(rows)
        print(table(rows).split("\n", 2)[-1], flush=True)

    checked = [r for r in results if r["pass"] is not None]
    report = {"benchmark": "lane_steps", "target": TARGET, "backend": "vmap",
              "machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "cpu_count": os.cpu_count(), "jax": jax.__version__,
                          "device": str(jax.devices()[0].device_kind)},
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "rounds": rounds, "results": results,
              "passed": sum(r["pass"] for r in checked), "checked": len(checked)}
    out = os.path.abspath(args.output)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    print()
    print(table(results))
    print(f"\n{report['passed']}/{report['checked']} workloads reach useful lane-steps >= {TARGET} "
          f"with the engine's choice of lanes ({rounds} rounds each)")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
