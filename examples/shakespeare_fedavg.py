"""Train FedAvg on federated Shakespeare (offline), then report test loss and accuracy.

Clients are the speaking roles of the 38 plays; the model predicts the next
character (embedding 8, 2x LSTM-256, vocabulary 90). Settings come from
``recipes/shakespeare_fedavg.py`` (variant ``demo`` by default: a few minutes
on a laptop CPU). Run ``python examples/shakespeare_fedavg.py --help``.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np
import optax
from flax import nnx

import fedtrain
from fedtrain.datasets import shakespeare
from fedtrain.models.shakespeare import ShakespeareLSTM
from recipes.shakespeare_fedavg import get_config


def most_frequent_character_accuracy(data) -> float:
    """Accuracy of always predicting the most frequent target character (PAD excluded)."""
    counts = np.zeros(shakespeare.VOCAB_SIZE, np.int64)
    for cid in data.client_ids:
        y = data.get_client(cid)["y"]
        counts += np.bincount(y[y != shakespeare.PAD], minlength=shakespeare.VOCAB_SIZE)
    return counts.max() / counts.sum()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="demo", choices=["demo", "paper"])
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--clients-per-round", type=int)
    parser.add_argument("--hidden-size", type=int)
    parser.add_argument("--max-test-clients", type=int, default=None, help="evaluate on the first N test clients")
    parser.add_argument("--verbose", type=int, default=None)
    args = parser.parse_args(argv)
    config = get_config(args.variant)
    for key in ("rounds", "clients_per_round", "hidden_size"):
        value = getattr(args, key)
        if value is not None:
            (config.model if key == "hidden_size" else config)[key] = value

    train, test = shakespeare.load_data()
    if args.max_test_clients:
        test = test.subset(test.client_ids[: args.max_test_clients])
    print(f"federated Shakespeare: {train.num_clients} train clients, {test.num_clients} test clients")
    model = ShakespeareLSTM(**config.model.to_dict(), rngs=nnx.Rngs(config.seed))
    trainer = fedtrain.FederatedTrainer(
        model,
        train,
        fedtrain.algorithms.fedavg(optax.sgd(config.client_learning_rate),
                                   server_learning_rate=config.server_learning_rate),
        loss=fedtrain.metrics.sequence_crossentropy(pad_id=shakespeare.PAD),
        metrics=[
            fedtrain.metrics.sequence_accuracy(pad_id=shakespeare.PAD),
            fedtrain.metrics.sequence_accuracy(pad_id=shakespeare.PAD, eos_id=shakespeare.EOS),
        ],
        seed=config.seed,
    )
    start = time.perf_counter()
    history = trainer.fit(rounds=config.rounds, clients_per_round=config.clients_per_round, batch_size=config.batch_size,
                local_epochs=config.local_epochs, validation_data=test, validation_freq=config.validation_freq,
                validation_batch_size=256, verbose="auto" if args.verbose is None else args.verbose)
    train_time = time.perf_counter() - start
    last = {k[4:]: v[-1] for k, v in history.history.items() if k.startswith("val_")}
    # The last round's validation already evaluated the final model on the test clients.
    results = last if config.rounds % config.validation_freq == 0 and last else trainer.evaluate(test, batch_size=256)
    baseline = most_frequent_character_accuracy(test)
    print(f"trained {config.rounds} rounds x {config.clients_per_round} clients in {train_time:.0f} s")
    print(f"test loss {results['loss']:.4f} - test accuracy {results['accuracy']:.4f} "
          f"(accuracy without EOS {results['accuracy_no_eos']:.4f}; "
          f"most-frequent-character baseline {baseline:.4f})")
    return {**results, "baseline_accuracy": baseline, "train_seconds": train_time}


if __name__ == "__main__":
    main()
