"""Your own data: split centralized numpy arrays into clients with a partitioner, then train.

``partitioners.dirichlet(labels, num_clients, alpha)`` gives each client a
Dirichlet(alpha) mix of labels (small alpha: few labels per client);
``iid``, ``shards`` and ``by_key`` are the other splits.
"""

import argparse

import numpy as np
import optax
from flax import nnx

import fedtrain
from fedtrain.data import partitioners


class MLP(nnx.Module):
    def __init__(self, features: int, classes: int, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(features, 32, rngs=rngs)
        self.out = nnx.Linear(32, classes, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


def make_arrays(n: int, features: int = 8, classes: int = 4, seed: int = 0):
    """Gaussian blobs around fixed centers: ``x`` float32 [n, features], ``y`` int32 [n]."""
    centers = np.random.default_rng(1234).normal(0, 1.5, (classes, features))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n).astype(np.int32)
    x = (centers[y] + rng.normal(0, 1, (n, features))).astype(np.float32)
    return x, y


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--num-clients", type=int, default=50)
    parser.add_argument("--alpha", type=float, default=0.5)
    args = parser.parse_args(argv)

    x, y = make_arrays(5000)
    part = partitioners.dirichlet(y, args.num_clients, args.alpha, seed=0)
    print(part.format_summary(y))
    train = part.apply({"x": x, "y": y})
    x_test, y_test = make_arrays(1000, seed=1)
    test = partitioners.iid(len(y_test), 10, seed=0).apply({"x": x_test, "y": y_test})

    model = MLP(8, 4, rngs=nnx.Rngs(0))
    trainer = fedtrain.FederatedTrainer(model, train, fedtrain.algorithms.fedavg(optax.sgd(0.1)),
                                        loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    trainer.fit(rounds=args.rounds, clients_per_round=10, batch_size=16, verbose=0)
    results = trainer.evaluate(test)
    print(f"test accuracy {results['accuracy']:.3f}")
    return results


if __name__ == "__main__":
    main()
