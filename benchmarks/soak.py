"""Soak test: many rounds of a small model with checkpoints every N rounds and TensorBoard logging.

Measures resident memory after round 100 and after the last round (they should differ
by < 50 MB) and the disk used by the checkpoint directory (bounded by ``max_to_keep``).

    python benchmarks/soak.py                      # 1,000 rounds, writes results/soak.json
    python benchmarks/soak.py --rounds 150 --early 50 --output /tmp/soak.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import optax
import psutil
from flax import nnx

import fedtrain
from fedtrain.callbacks import Callback, CSVLogger, OrbaxCheckpoint, TensorBoard


class SmallMLP(nnx.Module):
    def __init__(self, features=16, hidden=64, classes=4, *, rngs):
        self.l1 = nnx.Linear(features, hidden, rngs=rngs)
        self.l2 = nnx.Linear(hidden, classes, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.l1(x)))


def synthetic_clients(n=100, features=16, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(features, classes))
    out = {}
    for i in range(n):
        size = int(rng.integers(10, 60))
        x = rng.normal(size=(size, features)).astype(np.float32)
        out[f"c{i:04d}"] = {"x": x, "y": np.argmax(x @ w, -1).astype(np.int32)}
    return out


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


class Probe(Callback):
    """Records RSS after chosen rounds and the largest checkpoint directory seen."""

    def __init__(self, ckpt_dir: Path, marks: set[int]):
        super().__init__()
        self.ckpt_dir, self.marks = ckpt_dir, marks
        self.rss: dict[int, float] = {}
        self.max_ckpt_bytes = 0
        self.max_steps = 0
        self._proc = psutil.Process()

    def on_round_end(self, round, logs=None):
        done = round + 1
        if done % 10 == 0:
            self.max_ckpt_bytes = max(self.max_ckpt_bytes, dir_bytes(self.ckpt_dir))
            self.max_steps = max(self.max_steps, sum(p.name.isdigit() for p in self.ckpt_dir.iterdir()))
        if done in self.marks:
            gc.collect()
            self.rss[done] = self._proc.memory_info().rss / 2**20


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--early", type=int, default=100, help="round after which the first RSS is taken")
    parser.add_argument("--every", type=int, default=10, help="checkpoint every that many rounds")
    parser.add_argument("--max-to-keep", type=int, default=3)
    parser.add_argument("--workdir", default=None, help="where checkpoints and logs go (default: a temp dir)")
    parser.add_argument("--output", default=str(Path(__file__).resolve().parent / "results" / "soak.json"))
    args = parser.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fedtrain-soak-"))
    shutil.rmtree(work / "ckpt", ignore_errors=True)
    shutil.rmtree(work / "tb", ignore_errors=True)
    data = fedtrain.InMemoryFederatedData(synthetic_clients())
    server_tx = optax.inject_hyperparams(optax.adam)(learning_rate=0.01)
    algo = fedtrain.algorithms.fedopt(optax.sgd(0.05), server_tx)
    trainer = fedtrain.FederatedTrainer(SmallMLP(rngs=nnx.Rngs(0)), data, algo)
    probe = Probe(work / "ckpt", {args.early, args.rounds})
    t0 = time.perf_counter()
    trainer.fit(rounds=args.rounds, clients_per_round=10, batch_size=16, verbose=0,
                callbacks=[OrbaxCheckpoint(work / "ckpt", every_rounds=args.every, max_to_keep=args.max_to_keep),
                           TensorBoard(work / "tb", histogram_freq=50), CSVLogger(work / "log.csv"), probe])
    wall = time.perf_counter() - t0
    steps = sorted(int(p.name) for p in (work / "ckpt").iterdir() if p.name.isdigit())
    result = {
        "rounds": args.rounds,
        "checkpoint_every": args.every,
        "max_to_keep": args.max_to_keep,
        "rss_mb_after_early": round(probe.rss[args.early], 1),
        "early_round": args.early,
        "rss_mb_after_last": round(probe.rss[args.rounds], 1),
        "rss_growth_mb": round(probe.rss[args.rounds] - probe.rss[args.early], 1),
        "checkpoint_steps_on_disk": steps,
        "max_checkpoint_steps_seen": probe.max_steps,
        "max_checkpoint_dir_mb": round(probe.max_ckpt_bytes / 2**20, 3),
        "final_checkpoint_dir_mb": round(dir_bytes(work / "ckpt") / 2**20, 3),
        "tensorboard_dir_mb": round(dir_bytes(work / "tb") / 2**20, 3),
        "wall_s": round(wall, 1),
        "s_per_round": round(wall / args.rounds, 4),
        "compilations": trainer.engine.compilations,
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0],
                    "cpu_count": os.cpu_count()},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    result["ok"] = bool(result["rss_growth_mb"] < 50 and len(steps) <= args.max_to_keep
                        and probe.max_steps <= args.max_to_keep + 1)
    rows = [("rounds", result["rounds"]), (f"RSS after round {args.early} (MB)", result["rss_mb_after_early"]),
            (f"RSS after round {args.rounds} (MB)", result["rss_mb_after_last"]),
            ("RSS growth (MB, limit 50)", result["rss_growth_mb"]),
            ("checkpoint steps on disk", steps), ("largest checkpoint dir (MB)", result["max_checkpoint_dir_mb"]),
            ("TensorBoard dir (MB)", result["tensorboard_dir_mb"]), ("s/round", result["s_per_round"]),
            ("compilations", result["compilations"]), ("ok", result["ok"])]
    print("| measure | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
