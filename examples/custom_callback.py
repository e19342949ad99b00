"""A custom callback: subclass ``fedtrain.callbacks.Callback`` and write each round's logs to a file."""

import argparse
import json

import optax

import fedtrain


class RoundFileLogger(fedtrain.callbacks.Callback):
    """Appends one JSON line per round (round number, loss, clients sampled) to ``path``."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.clients: list = []

    def on_train_begin(self, logs=None):
        open(self.path, "w").close()

    def on_clients_sampled(self, round, client_ids):
        self.clients = list(client_ids)

    def on_round_end(self, round, logs=None):
        record = {"round": round + 1, "loss": logs["loss"], "clients": [str(c) for c in self.clients]}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--log", default="rounds.jsonl")
    args = parser.parse_args(argv)

    train, _ = fedtrain.datasets.emnist.load_data(source="synthetic")
    train = train.subset(train.client_ids[:50])
    trainer = fedtrain.FederatedTrainer(fedtrain.models.emnist_model("logistic"), train,
                                        fedtrain.algorithms.fedavg(optax.sgd(0.1)))
    trainer.fit(rounds=args.rounds, clients_per_round=5, batch_size=20, callbacks=[RoundFileLogger(args.log)],
                verbose=0)
    with open(args.log) as f:
        print(f.read().splitlines()[-1])
    return args.log


if __name__ == "__main__":
    main()
