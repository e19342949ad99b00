"""OrbaxCheckpoint in-process: contents, options, explicit restore, mismatches and bad input."""

import errno
import json
import math
import os
import warnings

import jax
import numpy as np
import optax
import pytest

import fedtrain
from fedtrain.callbacks import (
    BackupAndRestore, CheckpointError, CheckpointMismatchError, EarlyStopping, OrbaxCheckpoint, TerminateOnNaN)
from fedtrain.checkpoint_format import FORMAT_VERSION, latest_step
from tests.resume_script import make_algorithm, make_trainer, stateful

FIT = dict(clients_per_round=4, batch_size=8, verbose=0)


def steps(d):
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit())


def tree_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def snapshot(d):
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in d.rglob("*")}


def test_saves_everything_and_restores_exactly(tmp_path):
    trainer = make_trainer()
    trainer.fit(rounds=5, **FIT, callbacks=[OrbaxCheckpoint(tmp_path, every_rounds=2, max_to_keep=2)])
    assert steps(tmp_path) == [4, 5]  # every 2 rounds, the last round, newest 2 kept
    meta = json.loads((tmp_path / "5" / "metadata" / "metadata").read_text())
    assert meta["round"] == 5 and meta["seed"] == 3 and meta["format"] == FORMAT_VERSION
    assert meta["algorithm"] == "stateful_fedopt" and meta["fedtrain_version"] == fedtrain.__version__
    assert meta["history"]["rounds"] == [0, 1, 2, 3, 4]
    assert meta["history"]["history"]["loss"] == trainer.history.history["loss"]
    assert len(meta["client_ids"]) == len(trainer.client_states)

    other = make_trainer()
    assert other.restore(tmp_path) == 5
    assert tree_equal(other.server_state, trainer.server_state)
    assert other.client_states.state_dict().keys() == trainer.client_states.state_dict().keys()
    assert tree_equal(other.client_states.state_dict(), trainer.client_states.state_dict())
    assert other.history.history["loss"] == trainer.history.history["loss"]
    # An explicit step, then the remaining rounds, matches training straight through.
    again = make_trainer()
    assert again.restore(tmp_path, step=4) == 4
    again.fit(rounds=5, **FIT)
    assert tree_equal(again.server_state, trainer.server_state)
    with pytest.raises(CheckpointError, match="no checkpoint for step 3"):
        make_trainer().restore(tmp_path, step=3)
    with pytest.raises(CheckpointError, match="does not exist"):
        make_trainer().restore(tmp_path / "nope")


def test_implicit_resume_continues_from_the_last_round(tmp_path):
    first = make_trainer()
    first.fit(rounds=3, **FIT, callbacks=[OrbaxCheckpoint(tmp_path)])
    second = make_trainer()
    cb = OrbaxCheckpoint(tmp_path)
    history = second.fit(rounds=5, **FIT, callbacks=[cb])
    assert cb.restored_round == 3 and history.rounds == [0, 1, 2, 3, 4]
    straight = make_trainer()
    straight.fit(rounds=5, **FIT)
    assert tree_equal(second.server_state, straight.server_state)
    assert second.history.history["loss"] == straight.history.history["loss"]


def test_save_best_only_keeps_improvements(tmp_path):
    trainer = make_trainer()
    values = iter([3.0, 2.0, 2.5, 1.0, 4.0])

    class Fake(fedtrain.callbacks.Callback):
        def on_round_end(self, round, logs=None):
            logs["val_loss"] = next(values)

    cb = OrbaxCheckpoint(tmp_path, save_best_only=True, monitor="val_loss", max_to_keep=None)
    trainer.fit(rounds=5, **FIT, callbacks=[Fake(), cb])
    assert steps(tmp_path) == [1, 2, 4] and cb.best == 1.0
    with pytest.raises(ValueError, match="needs monitor"):
        OrbaxCheckpoint(tmp_path, save_best_only=True)
    with pytest.warns(RuntimeWarning, match="val_auc") as record:
        make_trainer().fit(rounds=3, **FIT, callbacks=[OrbaxCheckpoint(tmp_path / "b", save_best_only=True,
                                                                       monitor="val_auc")])
    assert len(record) == 1 and steps(tmp_path / "b") == []


def test_different_model_or_algorithm_is_refused_and_nothing_changes(tmp_path):
    make_trainer().fit(rounds=2, **FIT, callbacks=[OrbaxCheckpoint(tmp_path)])
    before = snapshot(tmp_path)
    wider = make_trainer(hidden=32)
    with pytest.raises(CheckpointMismatchError, match=r"l1.*kernel.*saved float32\[8, 16\], this trainer "
                                                      r"float32\[8, 32\]"):
        wider.fit(rounds=4, **FIT, callbacks=[OrbaxCheckpoint(tmp_path)])
    plain = make_trainer(algorithm=fedtrain.algorithms.fedadam(optax.sgd(0.1)))
    with pytest.raises(CheckpointMismatchError, match="algorithm: saved 'stateful_fedopt', this trainer 'fedadam'"):
        plain.restore(tmp_path)
    with pytest.raises(CheckpointMismatchError, match="client state"):
        make_trainer(algorithm=make_algorithm()._replace(client_state_init=None, name="stateful_fedopt")) \
            .restore(tmp_path)
    assert snapshot(tmp_path) == before


def test_checkpoint_from_a_newer_format_is_refused(tmp_path):
    make_trainer().fit(rounds=1, **FIT, callbacks=[OrbaxCheckpoint(tmp_path)])
    path = tmp_path / "1" / "metadata" / "metadata"
    meta = json.loads(path.read_text())
    meta["format"] = FORMAT_VERSION + 1
    path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointMismatchError, match=f"format {FORMAT_VERSION + 1}.*Upgrade fedtrain"):
        make_trainer().fit(rounds=2, **FIT, callbacks=[OrbaxCheckpoint(tmp_path)])


def test_checkpoint_from_before_0_2_is_refused_with_the_version_named(tmp_path):
    make_trainer().fit(rounds=1, **FIT, callbacks=[OrbaxCheckpoint(tmp_path)])
    path = tmp_path / "1" / "metadata" / "metadata"
    meta = json.loads(path.read_text())
    meta["format"], meta["fedtrain_version"] = 1, "0.1.0"
    path.write_text(json.dumps(meta))
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointMismatchError, match=r"format 1 by fedtrain 0\.1\.0.*reads format 2.*fedtrain<0\.2"):
        make_trainer().restore(tmp_path)
    assert snapshot(tmp_path) == before  # nothing was deleted or set aside


def test_nan_round_is_not_saved_and_terminate_on_nan_stops(tmp_path, capsys):
    trainer = make_trainer()
    trainer.fit(rounds=2, **FIT, callbacks=[OrbaxCheckpoint(tmp_path)])
    good = trainer.server_state
    trainer.set_hyperparam("learning_rate", 1e30)
    stop = TerminateOnNaN()
    with pytest.warns(RuntimeWarning) as record:
        history = trainer.fit(rounds=10, **FIT, callbacks=[stop, OrbaxCheckpoint(tmp_path)])
    messages = " ".join(str(w.message) for w in record)
    r = stop.stopped_round
    assert r is not None and len(history.rounds) == r + 1 and not math.isfinite(history.history["loss"][-1])
    assert f"round {r + 1}: the loss is not finite, so it is not saved" in messages
    assert f"round {r + 1}: the training loss is" in messages and stop.bad_clients[0] in messages
    assert f"Round {r + 1}: invalid loss" in capsys.readouterr().out
    assert latest_step(tmp_path) == r
    restored = make_trainer()
    restored.restore(tmp_path)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(restored.server_state))
    if r == 2:
        assert tree_equal(restored.server_state, good)


def test_unwritable_or_full_directory_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="is not writable"):
        make_trainer().fit(rounds=1, **FIT, callbacks=[OrbaxCheckpoint(blocker / "ckpt")])
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(CheckpointError, match="is not writable"):
            make_trainer().fit(rounds=1, **FIT, callbacks=[OrbaxCheckpoint(ro)])
    import orbax.checkpoint as ocp

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    with pytest.raises(CheckpointError, match="could not save round 1 .* the disk is full"):
        make_trainer().fit(rounds=1, **FIT, callbacks=[OrbaxCheckpoint(tmp_path / "full")])


def test_backup_and_restore_deletes_its_backup_at_the_end(tmp_path):
    d = tmp_path / "backup"
    seen = []

    class Look(fedtrain.callbacks.Callback):
        def on_round_end(self, round, logs=None):
            seen.append(d.exists())

    make_trainer().fit(rounds=2, **FIT, callbacks=[BackupAndRestore(d), Look()])
    assert not d.exists()
    with pytest.raises(ValueError, match="save_freq"):
        BackupAndRestore(d, save_freq="batch")


def test_callback_state_is_checkpointed(tmp_path):
    values = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8])

    class Fake(fedtrain.callbacks.Callback):
        def on_round_end(self, round, logs=None):
            logs["val_loss"] = next(values)

    es = EarlyStopping(patience=5)
    make_trainer().fit(rounds=4, **FIT, callbacks=[Fake(), es, OrbaxCheckpoint(tmp_path)])
    again = EarlyStopping(patience=5)
    make_trainer().fit(rounds=4, **FIT, callbacks=[Fake(), again, OrbaxCheckpoint(tmp_path)])
    assert (again.best, again.wait, again.best_round) == (2.0, 2, 1)
    assert stateful  # the helper module is shared with the subprocess tests


def test_early_stopping_best_weights_survive_a_resume(tmp_path):
    def callbacks():
        es = EarlyStopping(monitor="loss", patience=100, restore_best_weights=True)
        return es, [es, OrbaxCheckpoint(tmp_path)]

    es, cbs = callbacks()
    first = make_trainer()
    first.fit(rounds=3, **FIT, callbacks=cbs)
    best = es.best_weights
    assert best is not None
    meta = json.loads((tmp_path / "3" / "metadata" / "metadata").read_text())
    assert meta["callback_array_keys"] == ["0:EarlyStopping"]
    es2, cbs2 = callbacks()
    resumed = make_trainer()
    resumed.fit(rounds=3, **FIT, callbacks=cbs2)  # nothing left to train: only the restore runs
    assert resumed.round == 3 and tree_equal(es2.best_weights, best)
    assert es2.best == es.best and es2.best_round == es.best_round


def test_a_read_error_that_is_not_damage_is_raised_and_nothing_is_set_aside(tmp_path, monkeypatch):
    # An error about how the checkpoint is read (here orbax refusing a relative path, as it did before
    # every path was made absolute) is not corruption: restore raises it, nothing is skipped or renamed.
    import orbax.checkpoint as ocp

    make_trainer().fit(rounds=2, **FIT, callbacks=[OrbaxCheckpoint(tmp_path, async_save=False)])
    before = snapshot(tmp_path)

    def refuse(self, directory, *args, **kwargs):
        raise ValueError(f"Checkpoint path should be absolute. Got {os.path.relpath(directory)}")

    monkeypatch.setattr(ocp.Checkpointer, "restore", refuse)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(CheckpointError, match=r"cannot read .*2.*not a damaged checkpoint.*should be absolute"):
            make_trainer().restore(tmp_path)
        with pytest.raises(CheckpointError, match="should be absolute"):
            make_trainer().fit(rounds=3, **FIT, callbacks=[OrbaxCheckpoint(tmp_path, async_save=False)])
    assert snapshot(tmp_path) == before
    for error in (TypeError("restore() got an unexpected keyword argument"), ImportError("no module named x"),
                  PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "2" / "server_state"))):
        def fail(self, *args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(ocp.Checkpointer, "restore", fail)
        with pytest.raises(CheckpointError, match="not a damaged checkpoint"):
            make_trainer().fit(rounds=3, **FIT, callbacks=[OrbaxCheckpoint(tmp_path, async_save=False)])
        assert snapshot(tmp_path) == before


# A failed read of damaged arrays leaves orbax's background tasks to end on a closed event loop.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncate_array", "delete_array", "metadata_json", "checksum"])
def test_damaged_newest_step_falls_back_and_is_set_aside(tmp_path, damage):
    make_trainer().fit(rounds=3, **FIT, callbacks=[OrbaxCheckpoint(tmp_path, async_save=False)])
    newest = tmp_path / "3"
    if damage in ("truncate_array", "delete_array"):
        data = [p for p in (newest / "server_state" / "d").iterdir() if p.is_file()]  # what the manifest reads
        biggest = max(data, key=lambda p: p.stat().st_size)
        if damage == "delete_array":
            biggest.unlink()
        else:
            biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    else:
        path = newest / "metadata" / "metadata"
        text = path.read_text()
        if damage == "checksum":
            meta = json.loads(text)
            meta["checksum"] = "0" * 64
            path.write_text(json.dumps(meta))
        else:
            path.write_text(text[: len(text) // 2])
    with pytest.warns(RuntimeWarning, match=r"checkpoint .*3 is unreadable \(damaged.*falling back"):
        assert make_trainer().restore(tmp_path) == 2
    assert steps(tmp_path) == [1, 2, 3]  # an explicit restore changes nothing on disk
    cb = OrbaxCheckpoint(tmp_path, async_save=False)
    with pytest.warns(RuntimeWarning, match="is unreadable"):
        make_trainer().fit(rounds=3, **FIT, callbacks=[cb])
    assert cb.restored_round == 2 and (tmp_path / "3.corrupt").is_dir()
