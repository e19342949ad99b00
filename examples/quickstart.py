"""Quickstart: FedAvg on (synthetic) federated EMNIST in three lines.

The three lines are the ``FederatedTrainer`` constructor, ``fit`` and
``evaluate``; swap ``source="synthetic"`` for ``"fedjax"`` to use the real data.
"""

import argparse

import optax

import fedtrain


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=100, help="number of training clients to use")
    args = parser.parse_args(argv)

    train, test = fedtrain.datasets.emnist.load_data(source="synthetic")
    train, test = train.subset(train.client_ids[: args.clients]), test.subset(test.client_ids[:20])
    model = fedtrain.models.emnist_model("logistic")

    trainer = fedtrain.FederatedTrainer(model, train, fedtrain.algorithms.fedavg(optax.sgd(0.1)))
    trainer.fit(rounds=args.rounds, clients_per_round=10, batch_size=20, validation_data=test, verbose=2)
    results = trainer.evaluate(test)
    print(results)
    return results


if __name__ == "__main__":
    main()
