"""Run the client axis on several devices (backend ``"sharded"``).

As a script it asks XLA for 4 CPU devices (``XLA_FLAGS`` must be set before
JAX is imported); on a machine with several GPUs or TPU cores leave it out.
Results equal a one-device run: only where the clients run changes.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import argparse  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import fedtrain  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"{jax.device_count()} devices: {jax.devices()}")
    train, _ = fedtrain.datasets.emnist.load_data(source="synthetic")
    train = train.subset(train.client_ids[:40])
    params = {}
    for backend in ("sharded", "scan"):
        trainer = fedtrain.FederatedTrainer(fedtrain.models.emnist_model("logistic"), train,
                                            fedtrain.algorithms.fedavg(optax.sgd(0.1)), backend=backend)
        trainer.fit(rounds=args.rounds, clients_per_round=8, batch_size=20, verbose=0)
        params[backend] = [np.asarray(x) for x in jax.tree.leaves(trainer.params)]
        print(f"backend {trainer.backend}: round {trainer.round}")
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(params["sharded"], params["scan"]))
    print(f"max parameter difference sharded vs one device: {diff:.2e}")
    return {"devices": jax.device_count(), "max_diff": diff}


if __name__ == "__main__":
    main()
