"""GPU check in one ten-minute slot: vmap-vs-scan agreement, then the standard workloads' round times.

1. The device and JAX version.
2. Correctness: the same small run (24 synthetic EMNIST clients of 15-45 images, EMNIST CNN
   without dropout, FedAvg, 8 clients per round in 4 lanes of 2 slots, 3 rounds, batch 10 so
   that partial batches occur) with ``backend="vmap"`` and ``backend="scan"``; the final
   parameters must agree to rtol 1e-2 / atol 1e-3 on a GPU or TPU (TF32 matmuls, and the two
   backends batch them differently) and to 1e-5 on a CPU. Reports the largest difference and
   PASS/FAIL.
3. ``backend="vmap"``, lanes chosen by the engine, on synthetic data with the real shapes
   (benchmarks/suite.py's tasks and FedJAX's flags):
     emnist-10 / emnist-100  EMNIST CNN (1.2M parameters), 500 clients of 97-291 images, batch 10
     stackoverflow-50        LSTM-670 next-word model (vocabulary 10k + 4), 2,000 clients with
                             log-normal sizes (median 80, capped at 1,000), batch 16
   Per workload: first-round (compile) time, steady seconds per round (median of the other
   rounds), useful lane-steps, padding efficiency, lanes x slots, peak device memory
   (``memory_stats()["peak_bytes_in_use"]``; n/a where the platform reports none) and the
   projected time of 1,500 rounds (first round + 1,499 x steady).

Every stage runs in its own process (separate memory peaks, cold compiles), with
XLA_PYTHON_CLIENT_PREALLOCATE=false. The stages share a time budget (``--budget-s``, 540 s by
default): each has a deadline and stops after the round that would overrun it (a stage still
running a minute past its deadline is killed and reported as such). The exit status is 1 when
the correctness check fails or a stage does not finish.

    python benchmarks/gpu_check.py               # on the GPU machine; ~5-9 minutes
    python benchmarks/gpu_check.py --quick       # fewer rounds
    python benchmarks/gpu_check.py --cpu-smoke   # tiny data and models on the CPU (~2 minutes): checks the script
    python benchmarks/gpu_check.py --output /tmp/gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

WORKLOADS = {  # rounds: (full, --quick, --cpu-smoke); share: of the time budget
    "emnist-10": dict(task="emnist", clients_per_round=10, rounds=(30, 10, 3), share=0.20,
                      model="EMNIST CNN"),
    "emnist-100": dict(task="emnist", clients_per_round=100, rounds=(15, 6, 3), share=0.30,
                       model="EMNIST CNN"),
    "stackoverflow-50": dict(task="stackoverflow", clients_per_round=50, rounds=(15, 6, 3), share=0.35,
                             model="Stack Overflow LSTM"),
}
CORRECTNESS_SHARE = 0.15
PROJECTED_ROUNDS = 1500
KILL_GRACE_S = 60


# ---------------------------------------------------------------------------- workers (own processes)
def _peak_device_bytes():
    import jax
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # some platforms raise instead of returning None
        stats = {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else int(peak)


def worker_info() -> dict:
    import jax
    import jaxlib
    devices = jax.devices()
    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "backend": jax.default_backend(),
            "device_kind": str(devices[0].device_kind), "devices": [str(d) for d in devices],
            "device_count": len(devices), "python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count()}


def tolerance(backend: str) -> tuple[float, float]:
    """(rtol, atol): TF32 matmuls on GPUs (and bf16 passes on TPUs) need the looser one."""
    return (1e-5, 1e-5) if backend == "cpu" else (1e-2, 1e-3)


def worker_correctness() -> dict:
    import jax
    import numpy as np
    import optax
    from flax import nnx

    import fedtrain
    import synthetic
    from fedtrain.models.emnist import EmnistCNN

    data = fedtrain.InMemoryFederatedData(synthetic.emnist(num_clients=24, mean_size=30, seed=1))
    init = None
    params, infos, times = {}, {}, {}
    for backend in ("vmap", "scan"):
        module = EmnistCNN(62, dropout_rate=0.0, dense_dropout_rate=0.0, rngs=nnx.Rngs(0))
        trainer = fedtrain.FederatedTrainer(module, data, fedtrain.algorithms.fedavg(optax.sgd(0.05)),
                                            loss="sparse_categorical_crossentropy", metrics=[], backend=backend,
                                            lanes=4 if backend == "vmap" else None, seed=0)
        if init is None:
            init = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(trainer.params))]
        start = time.perf_counter()
        trainer.fit(rounds=3, clients_per_round=8, batch_size=10, local_epochs=1, verbose=0)
        times[backend] = time.perf_counter() - start
        params[backend] = [np.asarray(x, np.float64) for x in jax.tree.leaves(jax.device_get(trainer.params))]
        info = trainer.last_round_info
        infos[backend] = {k: info[k] for k in ("lanes", "slots", "capacity", "useful_lane_steps",
                                               "padding_efficiency", "compilations")}
    rtol, atol = tolerance(jax.default_backend())
    a, b = params["vmap"], params["scan"]
    max_abs = max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))
    max_rel = max(float(np.max(np.abs(x - y) / np.maximum(np.abs(y), 1e-12))) for x, y in zip(a, b))
    worst = max(float(np.max(np.abs(x - y) / (atol + rtol * np.abs(y)))) for x, y in zip(a, b))
    moved = max(float(np.max(np.abs(x - y))) for x, y in zip(b, init))
    finite = all(np.all(np.isfinite(x)) for x in a + b)
    return {"max_abs_diff": max_abs, "max_rel_diff": max_rel, "worst_over_tolerance": worst, "rtol": rtol,
            "atol": atol, "max_param_change": moved, "finite": bool(finite),
            "pass": bool(finite and worst <= 1.0 and moved > 0), "runs": infos, "seconds": times,
            "setup": "24 EMNIST clients of 15-45 images, EMNIST CNN without dropout, FedAvg (client SGD 0.05), "
                     "8 clients/round, batch 10, 3 rounds; vmap with 4 lanes"}


def worker_workload(name: str, rounds: int, tiny: bool, deadline: float) -> dict:
    import jax
    import numpy as np
    import optax

    import fedtrain
    import round_throughput as rt
    import suite
    from fedtrain.callbacks import Callback

    suite.register()
    spec = WORKLOADS[name]
    task, k = spec["task"], spec["clients_per_round"]
    t0 = time.perf_counter()
    module, data, client_lr, server_tx, loss, _, _ = rt.make_task(task, tiny)
    model_name = spec["model"]
    if tiny and task == "emnist":  # the CNN under vmap takes seconds per round on a CPU (the check above runs it)
        from flax import nnx

        from fedtrain.models.emnist import EmnistDense
        module, model_name = EmnistDense(62, hidden=32, rngs=nnx.Rngs(0)), "EMNIST 2NN-32 (smoke)"
    data_s = time.perf_counter() - t0
    algorithm = fedtrain.algorithms.fedopt(optax.sgd(client_lr), server_tx)
    trainer = fedtrain.FederatedTrainer(module, data, algorithm, loss=loss, metrics=[], backend="vmap", lanes=None,
                                        seed=0)

    class Record(Callback):
        def __init__(self):
            self.ends, self.infos, self.examples = [], [], []

        def on_round_end(self, r, logs=None):
            now = time.perf_counter()
            last = now - (self.ends[-1] if self.ends else start)
            self.ends.append(now)
            self.infos.append(dict(trainer.last_round_info))
            self.examples.append(logs["num_examples"])
            if len(self.ends) >= 2 and time.time() + last > deadline:
                trainer.stop_training = True  # the next round would overrun this stage's deadline

    record = Record()
    start = time.perf_counter()
    trainer.fit(rounds=rounds, clients_per_round=k, batch_size=rt.TASK_BATCH_SIZE.get(task, rt.BATCH_SIZE),
                local_epochs=1, callbacks=[record], verbose=0)
    times = np.diff([start] + record.ends)
    steady = [float(t) for t in times[1:]]
    steady_s = statistics.median(steady) if steady else None
    infos = record.infos
    params = sum(int(np.size(x)) for x in jax.tree.leaves(trainer.params))
    waits = [float(i.get("input_wait_s", 0.0)) for i in infos[1:]]
    return {
        "workload": name, "model": model_name, "parameters": params, "clients_per_round": k, "tiny": tiny,
        "data_s": data_s, "first_round_s": float(times[0]), "s_per_round": steady_s,
        "s_per_round_all": [float(t) for t in times], "rounds": len(times), "rounds_planned": rounds,
        "stopped_early": len(times) < rounds,
        "examples_per_s": float(sum(record.examples[1:]) / sum(steady)) if steady else None,
        "input_wait_fraction": float(sum(waits) / sum(steady)) if steady else None,
        "useful_lane_steps": float(np.mean([i["useful_lane_steps"] for i in infos])),
        "padding_efficiency": float(np.mean([i["padding_efficiency"] for i in infos])),
        "lanes": int(infos[-1]["lanes"]), "slots": int(infos[-1]["slots"]), "capacity": int(infos[-1]["capacity"]),
        "compilations": int(infos[-1]["compilations"]),
        "peak_device_bytes": _peak_device_bytes(),
        "projected_rounds": PROJECTED_ROUNDS,
        "projected_s": (float(times[0]) + (PROJECTED_ROUNDS - 1) * steady_s) if steady_s is not None else None,
    }


def _worker(args) -> None:
    if args.worker == "info":
        result = worker_info()
    elif args.worker == "correctness":
        result = worker_correctness()
    else:
        result = worker_workload(args.worker, args.rounds, args.tiny, args.deadline)
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------- driver
def run_stage(stage: str, env: dict, timeout: float, extra: list[str] = ()) -> dict:
    """Runs ``stage`` in a fresh process; ``{"error": ...}`` when it fails or is killed."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", stage, *extra]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-2000:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return {"error": f"killed after {timeout:.0f} s (past its deadline)", "stderr_tail": tail,
                "wall_s": time.perf_counter() - start}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit status {proc.returncode}", "stderr_tail": proc.stderr[-4000:],
                "wall_s": time.perf_counter() - start}
    result = json.loads(lines[-1][len("RESULT "):])
    result["wall_s"] = time.perf_counter() - start
    return result


def _mib(n) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.0f} MiB"


def _duration(s) -> str:
    if s is None:
        return "n/a"
    h, rem = divmod(int(round(s)), 3600)
    return f"{s:.0f} s ({h}:{rem // 60:02d}:{rem % 60:02d})"


def table(results: list[dict]) -> str:
    head = ("| workload | model | lanes x slots | first round s | steady s/round | rounds | useful lane-steps | "
            "padding eff. | compilations | peak device memory | projected 1,500 rounds |")
    rows = [head, "|" + "---|" * 11]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['workload']} | {WORKLOADS[r['workload']]['model']} | FAILED: {r['error']} |"
                        + " |" * 8)
            continue
        steady = "n/a" if r["s_per_round"] is None else f"{r['s_per_round']:.3f}"
        rows.append(f"| {r['workload']} | {r['model']} | {r['lanes']} x {r['slots']} | {r['first_round_s']:.1f} | "
                    f"{steady} | {r['rounds']} | {r['useful_lane_steps']:.3f} | {r['padding_efficiency']:.3f} | "
                    f"{r['compilations']} | {_mib(r['peak_device_bytes'])} | {_duration(r['projected_s'])} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer rounds per workload")
    mode.add_argument("--cpu-smoke", action="store_true",
                      help="tiny data and models on the CPU (EMNIST workloads with a 2NN-32 instead of the CNN, "
                           "tiny LSTM), 3 rounds each: checks the script end to end")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--no-correctness", action="store_true", help="skip the vmap-vs-scan check")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="time budget of all stages together (default 540 s: a 10-minute slot)")
    parser.add_argument("--allow-cpu", action="store_true", help="run the full sizes even without an accelerator")
    parser.add_argument("--output", help="JSON report (default results/gpu_check.json, "
                                         "results/gpu_check_cpu_smoke.json with --cpu-smoke)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    names = [w for w in args.workloads.split(",") if w]
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workloads {unknown}; choose from {list(WORKLOADS)}")

    t0 = time.time()
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    if args.cpu_smoke:
        env["JAX_PLATFORMS"] = "cpu"
    mode_name = "cpu-smoke" if args.cpu_smoke else ("quick" if args.quick else "full")
    info = run_stage("info", env, timeout=120)
    if "error" in info:
        print(f"could not start JAX: {info['error']}\n{info['stderr_tail']}", file=sys.stderr)
        return 1
    print(f"device: {info['device_kind']} x{info['device_count']} ({info['backend']}); jax {info['jax']}, "
          f"jaxlib {info['jaxlib']}, python {info['python']}; mode {mode_name}; budget {args.budget_s:.0f} s",
          flush=True)
    if info["backend"] == "cpu" and not (args.cpu_smoke or args.allow_cpu):
        print("no GPU/TPU visible to JAX: use --cpu-smoke (tiny sizes) or --allow-cpu (full sizes, slow)",
              file=sys.stderr)
        return 2
    if info["device_count"] > 1:
        print(f"note: {info['device_count']} devices visible; backend='vmap' runs on the first one only "
              "(set CUDA_VISIBLE_DEVICES=0 to hide the others)", flush=True)

    shares = ([] if args.no_correctness else [CORRECTNESS_SHARE]) + [WORKLOADS[n]["share"] for n in names]
    spent_before = time.time() - t0
    budget = max(args.budget_s - spent_before, 1.0)
    scale = budget / sum(shares)
    deadline = time.time()
    failed = False
    correctness = None
    if not args.no_correctness:
        deadline += CORRECTNESS_SHARE * scale
        correctness = run_stage("correctness", env, timeout=max(deadline - time.time(), 30) + KILL_GRACE_S)
        if "error" in correctness:
            failed = True
            print(f"correctness (vmap vs scan): FAILED to run: {correctness['error']}\n"
                  f"{correctness['stderr_tail']}", flush=True)
        else:
            c = correctness
            v, s = c["runs"]["vmap"], c["runs"]["scan"]
            failed |= not c["pass"]
            print(f"correctness (vmap {v['lanes']} lanes x {v['slots']} slots vs scan {s['lanes']} x {s['slots']}): "
                  f"max |diff| {c['max_abs_diff']:.3g} (max relative {c['max_rel_diff']:.3g}; params moved up to "
                  f"{c['max_param_change']:.3g}); tolerance rtol {c['rtol']:g} atol {c['atol']:g}, "
                  f"worst diff / tolerance {c['worst_over_tolerance']:.3g}: {'PASS' if c['pass'] else 'FAIL'}",
                  flush=True)

    results = []
    print(table([]), flush=True)
    for name in names:
        spec = WORKLOADS[name]
        rounds = spec["rounds"][2 if args.cpu_smoke else 1 if args.quick else 0]
        deadline += spec["share"] * scale
        extra = ["--rounds", str(rounds), "--deadline", repr(deadline)] + (["--tiny"] if args.cpu_smoke else [])
        res = run_stage(name, env, timeout=max(deadline - time.time(), 30) + KILL_GRACE_S, extra=extra)
        res.setdefault("workload", name)
        if "error" in res:
            failed = True
            print(table([res]).split("\n", 2)[-1], flush=True)
            print(res["stderr_tail"], file=sys.stderr, flush=True)
        else:
            print(table([res]).split("\n", 2)[-1], flush=True)
        results.append(res)

    report = {"benchmark": "gpu_check", "mode": mode_name, "machine": info, "budget_s": args.budget_s,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "wall_s": time.time() - t0,
              "correctness": correctness, "results": results}
    default = "gpu_check_cpu_smoke.json" if args.cpu_smoke else "gpu_check.json"
    out = os.path.abspath(args.output or os.path.join(HERE, "results", default))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    print()
    if correctness is not None and "error" not in correctness:
        print(f"correctness: {'PASS' if correctness['pass'] else 'FAIL'} "
              f"(max |diff| {correctness['max_abs_diff']:.3g})")
    print(table(results))
    print(f"\n{time.time() - t0:.0f} s in all; wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
