"""DP-FedAvg: clipped, noised client updates and the (epsilon, delta) spent, logged every round."""

import argparse

import optax

import fedtrain
from fedtrain.privacy import DPAccountant


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients-per-round", type=int, default=20)
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    parser.add_argument("--clip-norm", type=float, default=0.5)
    args = parser.parse_args(argv)

    train, test = fedtrain.datasets.emnist.load_data(source="synthetic")
    train, test = train.subset(train.client_ids[:500]), test.subset(test.client_ids[:20])
    algorithm = fedtrain.algorithms.dp_fedavg(optax.sgd(0.1), noise_multiplier=args.noise_multiplier,
                                              clip_norm=args.clip_norm,
                                              expected_clients_per_round=args.clients_per_round)
    trainer = fedtrain.FederatedTrainer(fedtrain.models.emnist_model("logistic"), train, algorithm)
    history = trainer.fit(rounds=args.rounds, clients_per_round=args.clients_per_round, batch_size=20,
                          callbacks=[DPAccountant(delta=1e-5)], verbose=0)
    epsilon = history.history["dp_epsilon"][-1]
    results = trainer.evaluate(test)
    print(f"{args.rounds} rounds of {args.clients_per_round}/{train.num_clients} clients, noise multiplier "
          f"{args.noise_multiplier}: epsilon = {epsilon:.2f} at delta = 1e-5; test accuracy {results['accuracy']:.3f}")
    return {"epsilon": epsilon, **results}


if __name__ == "__main__":
    main()
