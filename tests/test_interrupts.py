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


# ---------------------------------------------------------------------- a second Ctrl-C
def _second_ctrl_c_child(ckpt, out, async_save):
    """Runs tests.resume_script with a checkpoint whose round-4 save gets two SIGINTs: the first before the
    save starts, the second while orbax writes it (before the step is committed). Exits 130 on
    TrainingInterrupted, printing ``interrupted SIGNAME seconds`` (from the second signal to the raise)."""
    from orbax.checkpoint._src.path import atomicity

    from fedtrain.callbacks import OrbaxCheckpoint
    from fedtrain.trainer import TrainingInterrupted
    from tests import resume_script

    sent = {}
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def slow_finalize(self, *args, **kwargs):
        if self._final_path.name == "4" and "second" not in sent:
            sent["second"] = time.perf_counter()
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.0)  # the commit is still to come when the second signal is handled
        return await finalize(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = slow_finalize

    class TwoSignals(OrbaxCheckpoint):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "async_save": async_save})

        def _save(self, round, logs):
            if round + 1 == 4:
                os.kill(os.getpid(), signal.SIGINT)  # the first: this round's save still runs
            super()._save(round, logs)

    resume_script.OrbaxCheckpoint = TwoSignals
    try:
        resume_script.main([str(ckpt), str(out)])
    except TrainingInterrupted as e:
        print(f"interrupted {signal.Signals(e.signum).name} {time.perf_counter() - sent['second']:.3f}", flush=True)
        sys.exit(130)
    sys.exit(0)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from tests.test_resume import run

    d = tmp_path_factory.mktemp("uninterrupted")
    run(d / "ckpt", d / "out")
    return d / "out"


@pytest.mark.slow
@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
def test_a_second_ctrl_c_during_the_save_stops_at_once_and_the_previous_step_resumes(uninterrupted, tmp_path,
                                                                                    async_save):
    """The first SIGINT lets round 4's save run; the second, while orbax writes it, raises TrainingInterrupted
    at once: that save is abandoned (never committed half-written), step 2 is intact, the lock is released,
    and rerunning resumes to a bitwise identical result."""
    from tests.test_resume import assert_same_run, run

    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    code = f"import tests.test_interrupts as t; t._second_ctrl_c_child({str(ckpt)!r}, {str(out)!r}, {async_save})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 130, proc.stdout + proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("interrupted ")]
    assert len(line) == 1 and line[0].split()[1] == "SIGINT", proc.stdout
    assert float(line[0].split()[2]) < 0.9, line  # raised before the save it abandoned could have committed
    assert not (ckpt / ".fedtrain.lock").exists()
    assert 2 in steps(ckpt) and set(steps(ckpt)) <= {2, 4}
    from fedtrain.checkpoint_format import restore_latest
    from tests.resume_script import make_trainer

    trainer = make_trainer()
    assert int(restore_latest(trainer, ckpt)["round"]) == steps(ckpt)[-1]
    run(ckpt, out)
    assert_same_run(uninterrupted, out)


def test_a_callback_error_releases_the_lock_and_the_next_fit_takes_no_lock_over(tmp_path):
    """fit ended by another callback's exception (on_train_end does not run): the checkpoint's lock is
    released at once, so a new trainer fits into the same directory without a stale-lock warning."""
    import warnings

    from fedtrain.callbacks import Callback, OrbaxCheckpoint
    from fedtrain.callbacks.checkpoint import LOCK_FILE
    from tests.resume_script import make_trainer

    class Fails(Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("callback failed")

    ckpt = tmp_path / "ckpt"
    fit = dict(clients_per_round=4, batch_size=8, verbose=0)
    with pytest.raises(RuntimeError, match="callback failed"):
        make_trainer().fit(rounds=4, **fit, callbacks=[Fails(), OrbaxCheckpoint(ckpt)])
    assert not (ckpt / LOCK_FILE).exists()
    assert steps(ckpt) == [1]  # the background save of round 1 was finished, not abandoned
    t = make_trainer()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*lock.*")
        t.fit(rounds=3, **fit, callbacks=[OrbaxCheckpoint(ckpt)])
    assert t.round == 3 and steps(ckpt) == [1, 2, 3] and not (ckpt / LOCK_FILE).exists()


@pytest.mark.parametrize("where", ["feeder_close", "update_module"])
def test_a_second_signal_while_fit_unwinds_to_the_save_abandons_it_and_releases_the_lock(tmp_path, monkeypatch,
                                                                                         where):
    """The second SIGINT lands after the round's check raised but before fit waits for the in-flight save
    (while the input feeder is closed or the module updated): it is kept, raised as TrainingInterrupted
    where the wait would start, and the checkpoint's lock is released; finished steps are left intact."""
    from fedtrain import trainer as trainer_mod
    from fedtrain.callbacks import Callback, OrbaxCheckpoint
    from fedtrain.callbacks.checkpoint import LOCK_FILE
    from tests.resume_script import make_trainer

    sent = []

    class FirstSignal(Callback):
        def on_round_end(self, round, logs=None):
            if round == 2:
                os.kill(os.getpid(), signal.SIGINT)

    def second_signal_then(original):
        def wrapped(*args, **kwargs):
            if not sent and where_reached():
                sent.append(1)
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # delivered here, inside the unwinding
            return original(*args, **kwargs)
        return wrapped

    t = make_trainer()
    where_reached = lambda: t.round == 3  # noqa: E731 - only after the first signal's round
    if where == "feeder_close":
        monkeypatch.setattr(trainer_mod.RoundFeeder, "close", second_signal_then(trainer_mod.RoundFeeder.close))
    else:
        monkeypatch.setattr(t, "update_module", second_signal_then(t.update_module))
    ckpt = tmp_path / "ckpt"
    with pytest.raises(trainer_mod.TrainingInterrupted):
        t.fit(rounds=6, clients_per_round=4, batch_size=8, verbose=0,
              callbacks=[FirstSignal(), OrbaxCheckpoint(ckpt)])
    assert sent == [1] and t.round == 3
    assert not (ckpt / LOCK_FILE).exists()
    assert set(steps(ckpt)) <= {1, 2, 3} and steps(ckpt)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
