"""Ctrl-C and SIGTERM during `fedtrain train`: the in-flight save finishes, one line names the newest
checkpoint and the command that resumes, exit code 130 / 143, and rerunning it resumes."""

import csv
import os
import signal
import subprocess
import sys
import threading
import time

import optax
import pytest
from flax import nnx

import fedtrain
from tests.conftest import TinyMLP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "emnist_fedavg:tiny"


def steps(ckpt):
    return sorted(int(p) for p in os.listdir(ckpt) if p.isdigit()) if os.path.isdir(ckpt) else []


def rounds_in(workdir):
    with open(os.path.join(workdir, "metrics.csv"), newline="") as f:
        return [int(r["round"]) for r in csv.DictReader(f)]


def start_train(workdir, rounds):
    args = ["train", TINY, "--workdir", str(workdir), f"--config.rounds={rounds}", "--config.checkpoint_every=1",
            "--progress", "line"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "fedtrain", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    return proc, args


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_fit_stops_cleanly_and_the_printed_command_resumes(tmp_path, signum, code):
    workdir = tmp_path / "run"
    proc, args = start_train(workdir, 100000)
    output = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.time() + 240
    while len(steps(workdir / "checkpoints")) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "".join(output)
    proc.send_signal(signum)
    assert proc.wait(timeout=120) == code, "".join(output)
    reader.join(timeout=30)
    proc.stdout.close()
    text = "".join(output)
    assert "Traceback" not in text, text
    hint = [line for line in text.splitlines() if "rerun to resume" in line]
    assert len(hint) == 1, text
    last = steps(workdir / "checkpoints")[-1]
    assert f"stopped by {signal.Signals(signum).name}" in hint[0]
    assert f"round {last} in {workdir / 'checkpoints'}" in hint[0]
    command = hint[0].split("rerun to resume: ", 1)[1]
    assert command == "python -m fedtrain " + " ".join(args)
    # The rounds logged are the ones completed; the CSV ends at or after the newest checkpoint.
    assert rounds_in(workdir) == list(range(len(rounds_in(workdir)))) and len(rounds_in(workdir)) >= last
    # The printed command, with more rounds than saved but fewer than the 100000 asked, resumes at `last`.
    again = [a if not a.startswith("--config.rounds=") else f"--config.rounds={last + 2}" for a in args]
    result = subprocess.run([sys.executable, "-m", "fedtrain", *again], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resuming emnist_fedavg from {workdir / 'checkpoints'} (round {last})" in result.stdout
    assert rounds_in(workdir) == list(range(last + 2))


def test_sigterm_handler_is_restored_and_in_flight_round_end_finishes(data):
    """In-process: SIGTERM while a round's callbacks run lets them finish; then fit calls on_train_end and
    raises TrainingInterrupted(SIGTERM), and the previous SIGTERM handler is back."""
    from fedtrain import trainer as trainer_mod
    from fedtrain.callbacks import Callback

    events = []

    class Saver(Callback):
        def on_round_end(self, round, logs=None):
            events.append(("start", round))
            if round == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of the "save"
                time.sleep(0.05)
            events.append(("end", round))

        def on_train_end(self, logs=None):
            events.append(("train_end", None))

    previous = signal.getsignal(signal.SIGTERM)
    sentinel = lambda s, f: None  # noqa: E731
    signal.signal(signal.SIGTERM, sentinel)
    try:
        t = fedtrain.FederatedTrainer(TinyMLP(rngs=nnx.Rngs(0)), data, fedtrain.algorithms.fedavg(optax.sgd(0.1)))
        with pytest.raises(trainer_mod.TrainingInterrupted) as info:
            t.fit(rounds=10, clients_per_round=3, batch_size=8, callbacks=[Saver()], verbose=0)
        assert info.value.signum == signal.SIGTERM and isinstance(info.value, KeyboardInterrupt)
        assert events == [("start", 0), ("end", 0), ("start", 1), ("end", 1), ("train_end", None)]
        assert t.round == 2
        assert signal.getsignal(signal.SIGTERM) is sentinel
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_ctrl_c_keeps_the_backup_and_a_second_fit_resumes_from_it(data, tmp_path):
    """BackupAndRestore deletes its backup when training ends; not when Ctrl-C stopped it."""
    from fedtrain import trainer as trainer_mod
    from fedtrain.callbacks import BackupAndRestore, Callback

    class CtrlC(Callback):
        def on_round_end(self, round, logs=None):
            if round == 1:
                os.kill(os.getpid(), signal.SIGINT)

    def make():
        return fedtrain.FederatedTrainer(TinyMLP(rngs=nnx.Rngs(0)), data, fedtrain.algorithms.fedavg(optax.sgd(0.1)))

    backup = tmp_path / "backup"
    t = make()
    with pytest.raises(trainer_mod.TrainingInterrupted) as info:
        t.fit(rounds=5, clients_per_round=3, batch_size=8, callbacks=[CtrlC(), BackupAndRestore(backup)], verbose=0)
    assert info.value.signum == signal.SIGINT and t.round == 2
    assert steps(backup) == [2]  # the async save of round 2 finished, and the backup is kept
    t = make()
    t.fit(rounds=3, clients_per_round=3, batch_size=8, callbacks=[BackupAndRestore(backup)], verbose=0)
    assert t.round == 3 and t.history.rounds == [0, 1, 2] and not backup.exists()
