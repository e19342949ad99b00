"""Resume from an Orbax checkpoint after an interruption; the result equals an uninterrupted run.

The first run is cut off after ``--stop-after`` rounds (a callback raises, as a
kill would); rerunning the same code with the same ``OrbaxCheckpoint``
directory continues from the last saved round.
"""

import argparse
import tempfile

import numpy as np
import optax

import fedtrain


class Interrupt(fedtrain.callbacks.Callback):
    """Raises ``KeyboardInterrupt`` at the end of round ``after`` (stands in for Ctrl-C or a kill)."""

    def __init__(self, after: int):
        super().__init__()
        self.after = after

    def on_round_end(self, round, logs=None):
        if round + 1 == self.after:
            raise KeyboardInterrupt


def make_trainer(train):
    return fedtrain.FederatedTrainer(fedtrain.models.emnist_model("logistic"), train,
                                     fedtrain.algorithms.fedadam(optax.sgd(0.1), server_learning_rate=0.01), seed=1)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--stop-after", type=int, default=4)
    parser.add_argument("--checkpoint-dir", default=None, help="default: a temporary directory")
    args = parser.parse_args(argv)
    ckpt = args.checkpoint_dir or tempfile.mkdtemp(prefix="fedtrain-ckpt-")
    train, _ = fedtrain.datasets.emnist.load_data(source="synthetic")
    train = train.subset(train.client_ids[:50])
    fit = dict(rounds=args.rounds, clients_per_round=5, batch_size=20, verbose=0)

    trainer = make_trainer(train)
    try:
        trainer.fit(**fit, callbacks=[fedtrain.callbacks.OrbaxCheckpoint(ckpt, async_save=False), Interrupt(args.stop_after)])
    except KeyboardInterrupt:
        print(f"interrupted after round {trainer.round}")

    resumed = make_trainer(train)  # a fresh process would start here
    resumed.fit(**fit, callbacks=[fedtrain.callbacks.OrbaxCheckpoint(ckpt)])
    print(f"resumed at round {args.stop_after} and finished round {resumed.round}")

    reference = make_trainer(train)
    reference.fit(**fit)
    same = all(np.array_equal(a, b) for a, b in zip(*map(lambda t: [np.asarray(x) for x in
                                                                   __import__("jax").tree.leaves(t.params)],
                                                         (resumed, reference))))
    print(f"identical to an uninterrupted run: {same}")
    return {"rounds": resumed.round, "identical": same, "checkpoint_dir": ckpt}


if __name__ == "__main__":
    main()
