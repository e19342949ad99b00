"""Trains a tiny model for a few rounds and writes the final parameters and losses (scale tests).

    python tests/scale_script.py OUT.npz --backend sharded --devices 4 --algorithm fedavg
    python tests/scale_script.py OUT.npz --devices 2 --process-id 0 --num-processes 2 --port 12355
"""

import argparse
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--backend", default="auto")
parser.add_argument("--devices", type=int, default=1, help="CPU devices in this process")
parser.add_argument("--algorithm", default="fedavg", choices=["fedavg", "scaffold", "mime"])
parser.add_argument("--process-id", type=int, default=0)
parser.add_argument("--num-processes", type=int, default=1)
parser.add_argument("--port", type=int, default=0)
parser.add_argument("--seed", type=int, default=3)
parser.add_argument("--timeout", type=int, default=120)
args = parser.parse_args()
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402

import fedtrain  # noqa: E402

if args.num_processes > 1:
    fedtrain.distributed.initialize(f"127.0.0.1:{args.port}", args.num_processes, args.process_id,
                                    timeout_s=args.timeout)

import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from tests.conftest import TinyMLP, make_clients  # noqa: E402

algorithms = {
    "fedavg": lambda: fedtrain.algorithms.fedadam(optax.sgd(0.1), server_learning_rate=0.05),
    "scaffold": lambda: fedtrain.algorithms.scaffold(0.1),
    "mime": lambda: fedtrain.algorithms.mime(optax.sgd(0.1, momentum=0.9)),
}
data = fedtrain.InMemoryFederatedData(make_clients(num_clients=12))
trainer = fedtrain.FederatedTrainer(TinyMLP(dropout=0.2, rngs=nnx.Rngs(0, dropout=1)), data,
                                    algorithms[args.algorithm](), backend=args.backend, seed=args.seed)
history = trainer.fit(rounds=3, clients_per_round=5, batch_size=4, verbose=0)
params = jax.tree.leaves(jax.device_get(nnx.to_pure_dict(trainer.params)))
if jax.process_index() == 0:
    np.savez(args.out, *params, loss=np.asarray(history.history["loss"]), backend=trainer.backend,
             devices=jax.device_count(), processes=jax.process_count(),
             padding=trainer.last_round_info["padding_efficiency"])
if args.num_processes > 1:
    jax.distributed.shutdown()
