"""Checkpoint faults with real orbax checkpoints on disk: transient read errors, every step damaged,
NaN states, a second writer, edited metadata, a full disk, foreign entries and one-line warnings."""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

import fedtrain
from fedtrain import checkpoint_format
from fedtrain.callbacks import (CheckpointError, CheckpointLockedError, CheckpointReadError,
                                CheckpointUnreadableError, OrbaxCheckpoint)
from fedtrain.callbacks.checkpoint import LOCK_FILE
from fedtrain.checkpoint_format import latest_step
from tests.resume_script import make_trainer
from tests.test_reliability import adam_eps0_trainer, zero_feature_clients

ROOT = Path(__file__).resolve().parents[1]
FIT = dict(clients_per_round=4, batch_size=8, verbose=0)
NO_SPACE = ('RESOURCE_EXHAUSTED: Error writing local file "{d}/ocdbt.process_0/d/3f1c": No space left on device '
            '[tensorstore_spec=\'{{"context":{{"cache_pool":{{}},"file_io_concurrency":{{"limit":128}}}},'
            '"driver":"ocdbt","kvstore":{{"driver":"file","path":"{d}/"}}}}\'] [source locations=\'...\']')


def steps(d):
    return sorted(int(p.name) for p in d.iterdir() if p.name.isascii() and p.name.isdigit() and not p.is_symlink())


def snapshot(d):
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in d.rglob("*")}


def edit_metadata(step_dir, **changes):
    path = step_dir / "metadata" / "metadata"
    meta = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v(meta[k]) if callable(v) else v
    path.write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Steps 1, 2, 3 of a synchronous run; each test copies it."""
    d = tmp_path_factory.mktemp("saved") / "ckpt"
    make_trainer().fit(rounds=3, **FIT, callbacks=[OrbaxCheckpoint(d, async_save=False, max_to_keep=None)])
    return d


@pytest.fixture
def ckpt(saved, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(saved, d, symlinks=True)
    return d


# ---------------------------------------------------------------------- 1. transient read errors
@pytest.mark.parametrize("error", [OSError(errno.EIO, "Input/output error"), MemoryError("out of memory")],
                         ids=["EIO", "MemoryError"])
def test_a_transient_read_error_is_retried_then_raised_and_no_step_is_touched(ckpt, monkeypatch, error):
    import orbax.checkpoint as ocp

    monkeypatch.setattr(checkpoint_format, "READ_BACKOFF_S", 0.001)
    original = ocp.Checkpointer.restore
    calls = []

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if len(calls) <= 2:
            raise error
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ocp.Checkpointer, "restore", flaky)
    before = snapshot(ckpt)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert make_trainer().restore(ckpt) == 3  # two failures, then the read succeeds
    assert not [w for w in record if "unreadable" in str(w.message)]
    assert len(calls) >= 3 and snapshot(ckpt) == before

    def always(self, *args, **kwargs):
        calls.append(1)
        raise error

    monkeypatch.setattr(ocp.Checkpointer, "restore", always)
    calls.clear()
    with pytest.raises(CheckpointReadError, match=rf"step 3 in {ckpt}: .*transient.*3 attempts.*not damage"):
        make_trainer().restore(ckpt)
    assert len(calls) == checkpoint_format.READ_ATTEMPTS
    trainer = make_trainer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "falling back" warning: nothing is concluded from it
        with pytest.raises(CheckpointReadError, match=rf"step 3 in {ckpt}"):
            trainer.fit(rounds=5, **FIT, callbacks=[OrbaxCheckpoint(ckpt, async_save=False)])
    assert trainer.round == 0 and snapshot(ckpt) == before  # not started at 0, nothing renamed, lock released


# ---------------------------------------------------------------------- 2. every step damaged
def test_every_step_damaged_stops_unless_a_restart_is_asked_for(ckpt):
    for s in (1, 2, 3):
        edit_metadata(ckpt / str(s), checksum="0" * 64)
    before = snapshot(ckpt)
    trainer = make_trainer()
    with pytest.warns(RuntimeWarning, match="is unreadable"):
        with pytest.raises(CheckpointUnreadableError,
                           match=rf"no readable checkpoint in {ckpt}: every step is damaged \(steps tried: 3, 2, 1\)"
                                 r".*on_unreadable='restart'"):
            trainer.fit(rounds=4, **FIT, callbacks=[OrbaxCheckpoint(ckpt, async_save=False)])
    assert trainer.round == 0 and snapshot(ckpt) == before  # nothing renamed: a rerun says the same
    with pytest.warns(RuntimeWarning), pytest.raises(CheckpointUnreadableError, match="steps tried: 3, 2, 1"):
        make_trainer().restore(ckpt)
    with pytest.raises(ValueError, match="on_unreadable"):
        OrbaxCheckpoint(ckpt, on_unreadable="ignore")
    cb = OrbaxCheckpoint(ckpt, async_save=False, on_unreadable="restart")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        history = trainer.fit(rounds=2, **FIT, callbacks=[cb])
    assert any("training starts over from round 0" in str(w.message) for w in record)
    assert cb.restored_round is None and history.rounds == [0, 1]
    assert sorted(p.name for p in ckpt.iterdir()) == ["1", "1.corrupt", "2", "2.corrupt", "3.corrupt"]


# ---------------------------------------------------------------------- 3. NaN state
def test_a_nan_server_state_is_never_saved_nor_kept_as_best(tmp_path):
    trainer = adam_eps0_trainer(zero_feature_clients())
    every = OrbaxCheckpoint(tmp_path / "every", async_save=False)
    best = OrbaxCheckpoint(tmp_path / "best", async_save=False, save_best_only=True, monitor="loss")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(rounds=2, clients_per_round=3, batch_size=4, verbose=0, callbacks=[every, best])
    assert np.isfinite(trainer.history.history["loss"][0])  # the loss of round 1 looks fine
    messages = [str(w.message) for w in record]
    nan = [m for m in messages if m.startswith("round 1: the new server state holds NaN or inf, so it is not saved")]
    assert len(nan) == 2 and all("\n" not in m for m in nan)  # one line per callback
    assert steps(tmp_path / "every") == [] and steps(tmp_path / "best") == []
    assert best.best is None


# ---------------------------------------------------------------------- 4. the directory lock
def test_a_second_writer_is_refused_and_a_dead_holder_is_replaced(ckpt):
    code = textwrap.dedent(f"""
        import sys, time
        from fedtrain.callbacks.checkpoint import DirectoryLock
        DirectoryLock({str(ckpt)!r}).acquire()
        print("locked", flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        before = snapshot(ckpt)
        trainer = make_trainer()
        with pytest.raises(CheckpointLockedError, match=rf"{ckpt} is in use by another training run \(host "
                                                         rf"{socket.gethostname()}, pid {proc.pid}, started"):
            trainer.fit(rounds=4, **FIT, callbacks=[OrbaxCheckpoint(ckpt, async_save=False)])
        assert trainer.round == 0 and snapshot(ckpt) == before
        holder = json.loads((ckpt / LOCK_FILE).read_text())
        assert holder["pid"] == proc.pid and holder["host"] == socket.gethostname() and holder["started"]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    seen = []

    class Look(fedtrain.callbacks.Callback):
        def on_round_end(self, round, logs=None):
            seen.append(json.loads((ckpt / LOCK_FILE).read_text())["pid"])

    with pytest.warns(RuntimeWarning, match=rf"replacing the stale lock .*pid {proc.pid}.*is not running"):
        make_trainer().fit(rounds=4, **FIT, callbacks=[OrbaxCheckpoint(ckpt, async_save=False), Look()])
    assert seen == [os.getpid()]  # held by this run while it trains
    assert not (ckpt / LOCK_FILE).exists() and latest_step(ckpt) == 4  # released at the end


def test_a_stale_lock_file_is_reported_and_replaced_and_errors_release_the_lock(ckpt):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (ckpt / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                              "started": "2026-01-01T00:00:00+00:00"}))
    with pytest.warns(RuntimeWarning, match=rf"stale lock .*pid {dead.pid}, started 2026-01-01"):
        make_trainer().fit(rounds=4, **FIT, callbacks=[OrbaxCheckpoint(ckpt, async_save=False)])
    assert not (ckpt / LOCK_FILE).exists()
    # A lock on another host is never judged from here.
    (ckpt / LOCK_FILE).write_text(json.dumps({"host": "elsewhere", "pid": dead.pid, "started": "x"}))
    with pytest.raises(CheckpointLockedError, match="host elsewhere"):
        make_trainer().fit(rounds=5, **FIT, callbacks=[OrbaxCheckpoint(ckpt, async_save=False)])
    (ckpt / LOCK_FILE).unlink()

    class Boom(fedtrain.callbacks.Callback):
        def on_round_end(self, round, logs=None):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        make_trainer().fit(rounds=6, **FIT, callbacks=[OrbaxCheckpoint(ckpt, async_save=False), Boom()])
    # fit ended by an error releases the lock (on_train_abort), so the next fit takes nothing over.
    assert not (ckpt / LOCK_FILE).exists()
    # A lock of this process that no running fit holds is still judged stale.
    (ckpt / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                              "started": "2026-01-01T00:00:00+00:00"}))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make_trainer().fit(rounds=6, **FIT, callbacks=[OrbaxCheckpoint(ckpt, async_save=False)])
    assert any("earlier fit of this process" in str(w.message) for w in record)
    assert not (ckpt / LOCK_FILE).exists()


# ---------------------------------------------------------------------- 5. metadata checksum
def test_edited_metadata_is_damage_and_old_checkpoints_are_accepted_with_a_warning(ckpt):
    edit_metadata(ckpt / "3", round=40)
    with pytest.warns(RuntimeWarning, match=r"3 is unreadable \(damaged: the metadata values do not match"):
        assert make_trainer().restore(ckpt) == 2
    # A checkpoint written before the metadata checksum existed is read, with one warning saying so.
    edit_metadata(ckpt / "2", metadata_checksum=None)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert make_trainer().restore(ckpt) == 2
    assert [w.category for w in record if "without a metadata checksum" in str(w.message)] == [UserWarning]
    shutil.rmtree(ckpt / "3")
    shutil.rmtree(ckpt / "2")
    edit_metadata(ckpt / "1", history=lambda h: {**h, "rounds": [7]})
    with pytest.warns(RuntimeWarning), pytest.raises(CheckpointUnreadableError, match=r"steps tried: 1\)"):
        make_trainer().restore(ckpt)


# ---------------------------------------------------------------------- 6. disk full
def test_a_full_disk_is_one_error_naming_the_round_directory_and_free_space(ckpt, monkeypatch):
    import orbax.checkpoint as ocp

    original = ocp.CheckpointManager.save

    def full_at_5(self, step, *args, **kwargs):
        if step == 5:
            raise ValueError(NO_SPACE.format(d=ckpt / "5.orbax-checkpoint-tmp-1"))
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", full_at_5)
    with pytest.raises(CheckpointError, match=rf"could not save round 5 to {ckpt}: the disk is full "
                                              r"\([0-9.]+ MiB free\).*Older checkpoints are intact") as info:
        make_trainer().fit(rounds=6, **FIT, callbacks=[OrbaxCheckpoint(ckpt, async_save=False, max_to_keep=None)])
    assert "tensorstore_spec" not in str(info.value) and "\n" not in str(info.value)
    assert steps(ckpt) == [1, 2, 3, 4] and not (ckpt / LOCK_FILE).exists()
    assert make_trainer().restore(ckpt) == 4


def test_a_full_disk_in_a_background_save_names_the_round_it_was_writing(ckpt, monkeypatch):
    import orbax.checkpoint as ocp

    original_save, original_wait = ocp.CheckpointManager.save, ocp.CheckpointManager.wait_until_finished
    writing = []

    def save(self, step, *args, **kwargs):
        result = original_save(self, step, *args, **kwargs)
        writing.append(step)  # now writing in the background
        return result

    def wait(self):
        original_wait(self)
        if writing and writing[-1] == 4:  # the background write of round 4 failed
            writing.clear()
            raise ValueError(NO_SPACE.format(d=ckpt / "4.orbax-checkpoint-tmp-2"))

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", wait)
    with pytest.raises(CheckpointError, match=rf"could not save round 4 to {ckpt}: the disk is full"):
        make_trainer().fit(rounds=6, **FIT, callbacks=[OrbaxCheckpoint(ckpt, async_save=True, max_to_keep=None)])
    assert not (ckpt / LOCK_FILE).exists() and {1, 2, 3} <= set(steps(ckpt))


# ---------------------------------------------------------------------- 8. foreign entries
def test_links_and_non_ascii_step_names_are_ignored_and_links_never_followed(ckpt, tmp_path):
    target = tmp_path / "elsewhere"
    shutil.copytree(ckpt / "1", target)
    kept = snapshot(target)
    (ckpt / "0").symlink_to(target, target_is_directory=True)  # the oldest "step": what max_to_keep deletes
    (ckpt / "4").symlink_to(target, target_is_directory=True)  # the round the next save writes
    (ckpt / "\u00b2").mkdir()  # '²'.isdigit() is True, int('²') raises
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert latest_step(ckpt) == 3
        cb = OrbaxCheckpoint(ckpt, async_save=False, max_to_keep=2)
        make_trainer().fit(rounds=5, **FIT, callbacks=[cb])
    messages = [str(w.message) for w in record]
    assert cb.restored_round == 3
    assert any("ignoring" in m and m.split(" in the")[0].endswith("0") and "symbolic link" in m for m in messages)
    assert any("ignoring" in m and "\u00b2" in m and "not an ASCII step number" in m for m in messages)
    assert any("removing the symbolic link" in m and "its target is left as it is" in m for m in messages)
    assert snapshot(target) == kept  # never followed
    assert (ckpt / "0").is_symlink() and not (ckpt / "4").is_symlink() and (ckpt / "4").is_dir()
    assert steps(ckpt) == [4, 5] and (ckpt / "\u00b2").is_dir()


# ---------------------------------------------------------------------- 9. one-line warning
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_the_damage_warning_is_one_short_line(ckpt):
    data = [p for p in (ckpt / "3" / "server_state" / "d").iterdir() if p.is_file()]
    biggest = max(data, key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    with pytest.warns(RuntimeWarning, match=r"checkpoint .*3 is unreadable \(damaged") as record:
        assert make_trainer().restore(ckpt) == 2
    (message,) = [str(w.message) for w in record if "is unreadable" in str(w.message)]
    assert message.startswith(f"checkpoint {ckpt / '3'} is unreadable (damaged: ")
    assert "\n" not in message and "tensorstore_spec" not in message
    assert len(message) <= len(str(ckpt / "3")) + 300


def test_a_wrapped_tensorstore_status_naming_the_step_is_damage(tmp_path):
    from fedtrain.checkpoint_format import CheckpointCorruptError, CheckpointReadError, _read_failure

    step = tmp_path / "3"
    (step / "server_state").mkdir(parents=True)
    status = ValueError(f'FAILED_PRECONDITION: Error reading "d/1f2e" in OCDBT database at local file '
                        f'"{step}/server_state/": Truncated Zstd-compressed stream')
    try:
        try:
            raise status
        except ValueError as inner:
            raise Exception("restore failed") from inner  # how orbax re-raises a failed read
    except Exception as wrapped:
        failure = _read_failure(step, wrapped)
    assert isinstance(failure, CheckpointCorruptError) and "Truncated Zstd" in failure.detail
    elsewhere = ValueError(f'FAILED_PRECONDITION: Error reading "{tmp_path / "other" / "x"}"')
    try:
        try:
            raise elsewhere
        except ValueError as inner:
            raise Exception("restore failed") from inner
    except Exception as wrapped:  # a status about another path is not damage of this step
        assert isinstance(_read_failure(step, wrapped), CheckpointReadError)
