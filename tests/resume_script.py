"""A training script for the resume tests, run as a real process: ``python -m tests.resume_script CKPT OUT [--kill-at N]
[--kill-in-save N] [--rounds R]``. Writes the final state to OUT (npz + json)."""

import argparse
import json
import os
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import fedtrain
from fedtrain.algorithms.base import ClientOut
from fedtrain.callbacks import Callback, CSVLogger, OrbaxCheckpoint, ReduceLROnPlateau
from tests.conftest import TinyMLP, make_clients


def stateful(algorithm):
    """``algorithm`` plus a per-client state (a running sum of the client's update norms and visits)."""

    def client_state_init(params):
        return {"norm_sum": jnp.zeros((), jnp.float32), "visits": jnp.zeros((), jnp.int32)}

    def client_init(b, cs, prepass, ctx):
        return algorithm.client_init(b, None, prepass, ctx), cs

    def client_step(local, batch, ctx):
        inner, cs = local
        inner, sums = algorithm.client_step(inner, batch, ctx)
        return (inner, cs), sums

    def client_final(b, local, ctx):
        inner, cs = local
        out = algorithm.client_final(b, inner, ctx)
        norm = jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(out.update)))
        return ClientOut(out.update, out.weight, {"norm_sum": cs["norm_sum"] + norm, "visits": cs["visits"] + 1},
                         out.metrics)

    return algorithm._replace(name=f"stateful_{algorithm.name}", client_state_init=client_state_init,
                              client_init=client_init, client_step=client_step, client_final=client_final)


def make_algorithm():
    server_tx = optax.inject_hyperparams(optax.adam)(learning_rate=0.05)
    return stateful(fedtrain.algorithms.fedopt(optax.sgd(0.1), server_tx))


def make_trainer(hidden=16, algorithm=None):
    data = fedtrain.InMemoryFederatedData(make_clients(num_clients=10, max_size=30))
    return fedtrain.FederatedTrainer(TinyMLP(hidden=hidden, rngs=nnx.Rngs(0)), data,
                                     algorithm or make_algorithm(), seed=3)


class KillAt(Callback):
    runs_late = True  # after the checkpoint has seen the round

    def __init__(self, completed):
        super().__init__()
        self.completed = completed

    def on_round_end(self, round, logs=None):
        if round + 1 == self.completed:
            os.kill(os.getpid(), signal.SIGKILL)


class KillInSave(OrbaxCheckpoint):
    def __init__(self, *args, kill_at, **kw):
        super().__init__(*args, **kw)
        self.kill_at = kill_at

    def _save(self, round, logs):
        super()._save(round, logs)  # the async write is now in flight
        if round + 1 == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


def final_state(trainer) -> dict:
    leaves = {f"server_{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(trainer.server_state))}
    for cid, row in sorted(trainer.client_states.state_dict().items()):
        for i, x in enumerate(row):
            leaves[f"client_{cid}_{i}"] = np.asarray(x)
    return leaves


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("ckpt")
    p.add_argument("out")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--kill-at", type=int, default=0)
    p.add_argument("--kill-in-save", type=int, default=0)
    p.add_argument("--on-unreadable", default="error")
    a = p.parse_args(argv)
    trainer = make_trainer()
    ckpt_cls = OrbaxCheckpoint if not a.kill_in_save else KillInSave
    kw = {} if not a.kill_in_save else {"kill_at": a.kill_in_save}
    callbacks = [ReduceLROnPlateau(monitor="loss", factor=0.5, patience=1),
                 CSVLogger(os.path.join(a.out + ".csv"), append=True),
                 ckpt_cls(a.ckpt, every_rounds=2, max_to_keep=2, on_unreadable=a.on_unreadable, **kw)]
    if a.kill_at:
        callbacks.append(KillAt(a.kill_at))
    history = trainer.fit(rounds=a.rounds, clients_per_round=4, batch_size=8, verbose=0, callbacks=callbacks,
                          validation_data=trainer.train_data, validation_freq=3)
    np.savez(a.out + ".npz", **final_state(trainer))
    hist = {k: v for k, v in history.history.items() if k not in ("round_time", "val_time")}  # timings
    with open(a.out + ".json", "w") as f:
        json.dump({"rounds": history.rounds, "history": hist}, f)
    print("done", trainer.round, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
