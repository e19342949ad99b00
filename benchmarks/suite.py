"""Benchmark suite: the standard federated workloads, fedtrain side by side with FedJAX 0.0.17 and plain JAX.

Workloads (FedAvg family; synthetic data with the real shapes unless noted):
  emnist-10/50/100  EMNIST CNN, 500 clients of ~194 28x28 images, 62 classes, batch 10;
                    FedJAX's EMNIST_CONV flags (client SGD 0.001; server Adam 1.0, b2 0.99, eps 0.01).
  shakespeare-10    2x LSTM-256 on the offline federated Shakespeare (80-char sequences), batch 10;
                    FedJAX's SHAKESPEARE_CHARACTER flags (client SGD 0.0316, server SGD 1).
  stackoverflow-50  LSTM-670 next-word model (vocab 10k + 4), 2,000 clients of 20-token sentences with
                    heavy-tailed sizes (median 80, at most 1,000), batch 16; FedJAX's STACKOVERFLOW_WORD
                    flags (client SGD 0.5; server Adam 0.02, eps 1e-8).
  cifar100-10       ResNet-18 (GroupNorm) on 500 clients of 100 24x24x3 images, batch 20; Reddi et al.'s
                    FedYogi flags (client SGD 10^-1.5; server Yogi 1.0, eps 0.1). FedJAX has no ResNet.

Per workload and implementation: first-round (compile) time, s/round, examples/s (sequences/s for the
language tasks), padding efficiency, compilations, peak RSS (and peak device memory where JAX reports
it). fedtrain's examples/s is divided by the others' from the same run. Every measurement runs in its
own process. Both sides train on the same arrays and cohorts: FedJAX reads the data from a seed (numpy
only, benchmarks/synthetic.py) or from an .npz written here, and refuses data whose fingerprint differs.

    python benchmarks/suite.py                        # all workloads; FedJAX if its venv exists
    python benchmarks/suite.py --quick --with-fedjax  # fewer rounds; create the FedJAX venv if missing
    python benchmarks/suite.py --tiny --workloads emnist-10,stackoverflow-50 --no-fedjax
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np

import round_throughput as rt
import synthetic

WORKLOADS = {
    "emnist-10": dict(task="emnist", clients_per_round=10, rounds=8, quick_rounds=4),
    "emnist-50": dict(task="emnist", clients_per_round=50, rounds=4, quick_rounds=3),
    "emnist-100": dict(task="emnist", clients_per_round=100, rounds=3, quick_rounds=2),
    "shakespeare-10": dict(task="shakespeare", clients_per_round=10, rounds=6, quick_rounds=3),
    "stackoverflow-50": dict(task="stackoverflow", clients_per_round=50, rounds=3, quick_rounds=2),
    "cifar100-10": dict(task="cifar100", clients_per_round=10, rounds=4, quick_rounds=2),
}
SEQUENCE_TASKS = ("shakespeare", "stackoverflow")
FEDJAX_TASKS = ("emnist", "shakespeare", "stackoverflow")

# Flags shared by both sides: client SGD lr, server optimizer, batch size (emnist and shakespeare
# are round_throughput's tasks, with the same values).
FLAGS = {
    "emnist": dict(client_lr=0.001, server="adam", server_lr=1.0, b1=0.9, b2=0.99, eps=0.01, batch_size=10),
    "shakespeare": dict(client_lr=0.0316, server="sgd", server_lr=1.0, batch_size=10),
    "stackoverflow": dict(client_lr=0.5, server="adam", server_lr=0.02, b1=0.9, b2=0.999, eps=1e-8,
                          batch_size=16),
    "cifar100": dict(client_lr=10 ** -1.5, server="yogi", server_lr=1.0, b1=0.9, b2=0.999, eps=0.1,
                     batch_size=20),
}


# ---------------------------------------------------------------------------- data and tasks
def data_spec(task: str, tiny: bool) -> dict:
    """How each task's clients are made: a synthetic generator and its kwargs, or the Shakespeare dataset."""
    if task == "emnist":  # round_throughput.synthetic_emnist's arguments
        return {"generator": "emnist", "kwargs": dict(num_clients=120 if tiny else 500, mean_size=24 if tiny else 194)}
    if task == "stackoverflow":
        return {"generator": "stackoverflow", "kwargs": dict(num_clients=60 if tiny else 2000,
                                                             vocab_size=200 if tiny else 10_000,
                                                             median_size=12 if tiny else 80,
                                                             max_size=40 if tiny else 1000)}
    if task == "cifar100":
        return {"generator": "cifar100", "kwargs": dict(num_clients=40 if tiny else 500, size=10 if tiny else 100)}
    if task == "shakespeare":
        return {"dataset": "shakespeare"}
    raise ValueError(f"unknown task {task!r}")


def client_arrays(task: str, tiny: bool) -> dict:
    """``{client_id: {"x", "y"}}`` in population order, exactly what the fedtrain side trains on."""
    spec = data_spec(task, tiny)
    if "generator" in spec:
        return synthetic.generate(spec["generator"], **spec["kwargs"])
    from fedtrain.datasets import shakespeare
    data = shakespeare.load_data("train")
    if tiny:
        data = data.subset(data.client_ids[:120])
    return {c: {k: np.asarray(v) for k, v in data.get_client(c).items() if k in ("x", "y")} for c in data.client_ids}


def model_sizes(task: str, tiny: bool) -> dict:
    if task == "stackoverflow":
        return dict(vocab_size=200, embed_size=8, hidden_size=16) if tiny else {}
    if task == "shakespeare":
        return dict(hidden_size=32) if tiny else {}
    return {}


def _server_tx(flags: dict):
    import optax
    name = flags["server"]
    if name == "sgd":
        return optax.sgd(flags["server_lr"])
    opt = {"adam": optax.adam, "yogi": optax.yogi}[name]
    return opt(flags["server_lr"], b1=flags["b1"], b2=flags["b2"], eps=flags["eps"])


def stackoverflow_task(tiny: bool):
    """make_task's tuple for Stack Overflow next-word prediction."""
    import fedtrain
    from flax import nnx

    from fedtrain.models.stackoverflow import PAD, StackOverflowLSTM
    flags = FLAGS["stackoverflow"]
    data = fedtrain.InMemoryFederatedData(client_arrays("stackoverflow", tiny))
    module = StackOverflowLSTM(**model_sizes("stackoverflow", tiny), rngs=nnx.Rngs(0))
    loss = fedtrain.metrics.sequence_crossentropy(pad_id=PAD)
    return module, data, flags["client_lr"], _server_tx(flags), loss, "x", "y"


def cifar100_task(tiny: bool):
    """make_task's tuple for CIFAR-100 with ResNet-18."""
    import fedtrain
    from flax import nnx

    from fedtrain.models.cifar import ResNet18
    flags = FLAGS["cifar100"]
    data = fedtrain.InMemoryFederatedData(client_arrays("cifar100", tiny))
    sizes = dict(width=4, blocks=(1, 1, 1, 1)) if tiny else {}
    module = ResNet18(100, **sizes, rngs=nnx.Rngs(0))
    loss = fedtrain.metrics.get("sparse_categorical_crossentropy")
    return module, data, flags["client_lr"], _server_tx(flags), loss, "x", "y"


def register() -> None:
    """Adds this suite's tasks and workloads to round_throughput's registries."""
    rt.TASKS.update(stackoverflow=stackoverflow_task, cifar100=cifar100_task)
    rt.TASK_BATCH_SIZE.update({task: f["batch_size"] for task, f in FLAGS.items()})
    rt.WORKLOADS.update(WORKLOADS)


# ---------------------------------------------------------------------------- FedJAX
def fedjax_python(create: bool) -> str | None:
    """The FedJAX venv's python; created by fedjax_env.sh when ``create``; None when absent."""
    script = os.path.join(HERE, "fedjax_env.sh")
    if not create:
        bench = os.environ.get("FEDTRAIN_BENCH_DIR", os.path.expanduser("~/.cache/fedtrain"))
        venv = os.environ.get("FEDTRAIN_FEDJAX_VENV", os.path.join(bench, "fedjax-venv"))
        python = os.path.join(venv, "bin", "python")
        stamp = os.path.join(venv, ".fedtrain-requirements")
        return python if os.path.exists(python) and os.path.exists(stamp) else None
    proc = subprocess.run(["bash", script], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"creating the FedJAX venv failed:\n{proc.stderr[-3000:]}")
    return proc.stdout.strip().splitlines()[-1]


def cohorts(population: int, clients_per_round: int, rounds: int) -> list[list[int]]:
    """The cohorts fedtrain's trainer and the reference draw (seed 0)."""
    from fedtrain.samplers import UniformSampler
    return [[int(i) for i in UniformSampler().sample(0, r, population, clients_per_round)] for r in range(rounds)]


def measure_fedjax(python: str, name: str, rounds: int, tiny: bool, workdir: str, hidden_size: int | None) -> dict:
    spec = WORKLOADS[name]
    task = spec["task"]
    clients = client_arrays(task, tiny)
    source = data_spec(task, tiny)
    cmd = [python, os.path.join(HERE, "fedjax_baseline.py"), "--task", task,
           "--clients-per-round", str(spec["clients_per_round"]), "--rounds", str(rounds),
           "--expect-fingerprint", synthetic.fingerprint(clients)]
    if "generator" in source and task == "emnist":  # ~300 MB: regenerated from the seed on the other side
        cmd += ["--generator-kwargs", json.dumps(source["kwargs"])]
    else:
        path = os.path.join(workdir, f"{task}{'-tiny' if tiny else ''}.npz")
        if not os.path.exists(path):
            synthetic.save_npz(path, clients)
        cmd += ["--data", path]
    cohort_path = os.path.join(workdir, f"cohorts-{name}-{rounds}.json")
    with open(cohort_path, "w") as f:
        json.dump(cohorts(len(clients), spec["clients_per_round"], rounds), f)
    cmd += ["--cohorts", cohort_path]
    for key, value in FLAGS[task].items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    sizes = model_sizes(task, tiny)
    if hidden_size:
        sizes["hidden_size"] = hidden_size
    for key, value in sizes.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"FedJAX on {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# ---------------------------------------------------------------------------- fedtrain / reference workers
def _device_peak_mb() -> float | None:
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2 ** 20


def _worker(args) -> None:
    register()
    runner = {"fedtrain": rt.run_fedtrain, "reference": rt.run_reference}[args.impl]
    spec = WORKLOADS[args.workload]
    result = runner(spec["task"], spec["clients_per_round"], args.rounds, args.tiny)
    result["peak_device_mb"] = _device_peak_mb()
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------- report
IMPL_NAMES = {"fedtrain": "fedtrain", "reference": "plain JAX", "fedjax": "FedJAX 0.0.17"}


def table(results: list[dict]) -> str:
    head = ("| workload | impl | first round s | s/round | examples/s | vs plain JAX | vs FedJAX | padding eff. | "
            "compilations | peak RSS MB |")
    rows = [head, "|" + "---|" * 10]
    for res in results:
        unit = "seq/s" if WORKLOADS[res["workload"]]["task"] in SEQUENCE_TASKS else "ex/s"

        def ratio(key):
            value = res.get(key)
            return "" if value is None else f"{value:.2f}x"
        pad, comp = res.get("padding_efficiency"), res.get("compilations")
        rows.append(f"| {res['workload']} | {res['impl']} | {res['first_round_s']:.1f} | {res['s_per_round']:.2f} | "
                    f"{res['examples_per_s']:.1f} {unit} | {ratio('ratio_to_reference')} | "
                    f"{ratio('ratio_to_fedjax')} | "
                    f"{'' if pad is None else f'{pad:.3f}'} | {'' if comp is None else comp} | "
                    f"{res['peak_rss_mb']:.0f} |")
    return "\n".join(rows)


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# fedtrain benchmark suite ({report['time']})", "",
             f"{m['platform']}, {m['cpu_count']} CPUs, {m['device']}, jax {m['jax']}, python {m['python']}"
             f"{'; tiny (smoke test) sizes' if report['tiny'] else ''}{'; quick' if report['quick'] else ''}.",
             "", table(report["results"]), ""]
    lines += [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--quick", action="store_true", help="fewer rounds per workload")
    parser.add_argument("--tiny", action="store_true", help="tiny data and models (smoke test)")
    parser.add_argument("--rounds", type=int, help="rounds per measurement (default per workload)")
    parser.add_argument("--no-reference", action="store_true", help="skip the plain-JAX reference")
    fedjax = parser.add_mutually_exclusive_group()
    fedjax.add_argument("--with-fedjax", action="store_true", help="create the FedJAX venv if missing")
    fedjax.add_argument("--no-fedjax", action="store_true", help="skip FedJAX even if its venv exists")
    parser.add_argument("--fedjax-hidden-size", type=int,
                        help="FedJAX Shakespeare/Stack Overflow LSTM size (a smaller one compiles faster)")
    parser.add_argument("--output", default=os.path.join(HERE, "results", "suite.json"),
                        help="JSON report; the Markdown table goes next to it (.md)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return {}
    names = [w for w in args.workloads.split(",") if w]
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workloads {unknown}; choose from {list(WORKLOADS)}")

    notes = []
    python = None
    if not args.no_fedjax:
        python = fedjax_python(create=args.with_fedjax)
        if python is None:
            note = ("FedJAX skipped: no venv (run benchmarks/fedjax_env.sh or pass --with-fedjax)")
            print(note, flush=True)
            notes.append(note)
    if args.fedjax_hidden_size:
        notes.append(f"FedJAX LSTMs ran with hidden size {args.fedjax_hidden_size} (not fedtrain's).")
    results = []
    workdir = tempfile.mkdtemp(prefix="fedtrain-suite-")
    for name in names:
        spec = WORKLOADS[name]
        rounds = args.rounds or (spec["quick_rounds"] if args.quick or args.tiny else spec["rounds"])
        ours = {"workload": name, "impl": IMPL_NAMES["fedtrain"],
                **rt.measure(name, "fedtrain", rounds, args.tiny, script=os.path.abspath(__file__))}
        rows = [ours]
        if not args.no_reference:
            ref = {"workload": name, "impl": IMPL_NAMES["reference"],
                   **rt.measure(name, "reference", rounds, args.tiny, script=os.path.abspath(__file__))}
            ours["ratio_to_reference"] = ours["examples_per_s"] / ref["examples_per_s"]
            rows.append(ref)
        if python is not None:
            if spec["task"] not in FEDJAX_TASKS:
                note = f"{name}: FedJAX has no ResNet-18 (only a CIFAR-100 logistic model); not run."
                notes.append(note)
                print(note, flush=True)
            else:
                try:
                    res = {"workload": name, "impl": IMPL_NAMES["fedjax"],
                           **measure_fedjax(python, name, rounds, args.tiny, workdir, args.fedjax_hidden_size)}
                    ours["ratio_to_fedjax"] = ours["examples_per_s"] / res["examples_per_s"]
                    rows.append(res)
                except RuntimeError as err:
                    notes.append(f"{name}: {str(err).splitlines()[0]}")
                    print(err, file=sys.stderr, flush=True)
        results.extend(rows)
        print(table(rows).split("\n", 2)[-1], flush=True)
    shutil.rmtree(workdir, ignore_errors=True)

    report = {"benchmark": "suite", "machine": rt.machine(), "tiny": args.tiny, "quick": args.quick,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "fedjax": python is not None, "notes": notes,
              "flags": {WORKLOADS[n]["task"]: FLAGS[WORKLOADS[n]["task"]] for n in names}, "results": results}
    out = os.path.abspath(args.output)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    md = os.path.splitext(out)[0] + ".md"
    with open(md, "w") as f:
        f.write(markdown(report))
    print()
    print(table(results))
    print(f"\nwrote {out} and {md}")
    return report


if __name__ == "__main__":
    main()
