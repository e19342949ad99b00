"""OrbaxCheckpoint and BackupAndRestore: save rounds with orbax, resume exactly after a crash.

What a checkpoint holds and how it is read back is :mod:`fedtrain.checkpoint_format`.
"""

from __future__ import annotations

import datetime
import errno
import json
import math
import os
import shutil
import socket
import threading
import warnings
from pathlib import Path

from fedtrain.callbacks.base import Callback
from fedtrain.callbacks.early_stopping import MonitoredMetric
from fedtrain.checkpoint_format import (CheckpointCorruptError, CheckpointError, CheckpointLockedError,
                                        CheckpointMismatchError, CheckpointReadError, CheckpointUnreadableError,
                                        _callback_arrays, _history_with, _metadata, _ocp, _server_tree,
                                        _stack_clients, _steps, absolute, is_own_step, latest_step, log, one_line,
                                        restore_latest, seal_metadata, set_aside_steps)

LOCK_FILE = ".fedtrain.lock"
_held_locks: dict[str, tuple[int, str]] = {}  # lock path -> (thread ident, token) held by this process


# ---------------------------------------------------------------------- the directory lock
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    return True


def _read_lock(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _describe(holder: dict) -> str:
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}"


class DirectoryLock:
    """An exclusive lock on a checkpoint directory: ``<directory>/.fedtrain.lock``, created with
    O_CREAT|O_EXCL and holding the host, pid and start time of its holder. A lock whose holder ran on
    this host and is no longer running is stale: it is reported and replaced."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / LOCK_FILE
        self.token: str | None = None

    def acquire(self) -> None:
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        token = json.dumps(me, sort_keys=True)
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale(me)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(token)
                f.flush()
                os.fsync(f.fileno())
            self.token = token
            _held_locks[str(self.path)] = (threading.get_ident(), token)
            return
        raise CheckpointLockedError(f"could not take the lock {self.path}: it keeps reappearing.")

    def _take_over_if_stale(self, me: dict) -> None:
        raw = None
        try:
            raw = self.path.read_text()
        except FileNotFoundError:
            return  # released meanwhile: try again
        except OSError:
            pass
        holder = _read_lock(self.path)
        if holder is None:
            raise CheckpointLockedError(
                f"checkpoint directory {self.path.parent} is locked by {self.path}, which cannot be read; if no "
                "training run uses this directory, delete that file.")
        stale = None
        if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int):
            pid = holder["pid"]
            if pid == me["pid"]:
                held = _held_locks.get(str(self.path))
                alive = {t.ident for t in threading.enumerate()}
                if held is None or held[1] != raw or held[0] == threading.get_ident() or held[0] not in alive:
                    stale = "left by an earlier fit of this process that did not end normally"
            elif not _pid_alive(pid):
                stale = f"process {pid} is not running"
        if stale is None:
            raise CheckpointLockedError(
                f"checkpoint directory {self.path.parent} is in use by another training run ({_describe(holder)}); "
                f"two writers would corrupt it. Wait for that run to end or stop it; if it is no longer running, "
                f"delete {self.path}.")
        warnings.warn(f"replacing the stale lock {self.path} ({_describe(holder)}): {stale}.", RuntimeWarning,
                      stacklevel=4)
        try:
            if self.path.read_text() == raw:  # unchanged since it was judged stale
                self.path.unlink()
        except FileNotFoundError:
            pass

    def release(self) -> None:
        if self.token is None:
            return
        try:
            if self.path.read_text() == self.token:
                self.path.unlink()
        except OSError:
            pass
        if _held_locks.get(str(self.path), (None, None))[1] == self.token:
            del _held_locks[str(self.path)]
        self.token = None


def _own_steps_format(inner):
    """Orbax's step name format, seeing only the steps fedtrain wrote (never a link or a foreign name),
    so orbax never reads, counts or deletes anything else."""

    class OwnSteps:
        def __getattr__(self, name):
            return getattr(inner, name)

        def find_all(self, base_path):
            return (m for m in inner.find_all(base_path) if is_own_step(Path(os.fspath(m.path))))

        def find_step(self, base_path, step):
            m = inner.find_step(base_path, step)
            if not is_own_step(Path(os.fspath(m.path))):
                raise ValueError(f"No step path found for step={step} under {base_path}.")
            return m

    return OwnSteps()

# ---------------------------------------------------------------------- the callbacks
class OrbaxCheckpoint(Callback):
    """Saves training state with an orbax ``CheckpointManager`` and resumes from it.

    ``every_rounds``: save after every that many completed rounds (and after the last
    round, or when training stops early). ``max_to_keep``: newest steps kept on disk
    (``None`` keeps all). ``save_best_only``: save only when ``monitor`` improves
    (``mode`` ``'min'``, ``'max'`` or ``'auto'``). ``async_save``: write in the
    background while the next rounds run. ``resume``: at train begin, restore the
    newest good checkpoint in ``directory`` (so rerunning a script continues it) unless the
    trainer already holds trained state (a second ``fit``, or after ``trainer.restore``).
    A damaged newest step (missing or truncated files, a checksum mismatch) is renamed
    ``<step>.corrupt`` and the previous one restored; any other failure to read a step (a
    different model, permissions, the installed packages) raises and leaves the directory as it is.
    When every step is damaged, fit stops with :class:`CheckpointUnreadableError` naming the steps
    tried (``on_unreadable='error'``, the default); ``on_unreadable='restart'`` sets them aside and
    trains from round 0. A transient read error (EIO, memory) is retried, then raised; nothing is renamed.
    A round whose loss is not finite, or whose new server state holds NaN/inf, is never saved (nor
    kept as best). While ``fit`` runs, the directory is locked (``.fedtrain.lock``: host, pid, start
    time); a second writer is refused, a stale lock of a dead process on this host is replaced.
    ``directory`` may be relative (to the working directory when the callback is created).
    """

    runs_late = True

    def __init__(self, directory: str | os.PathLike, *, every_rounds: int = 1, max_to_keep: int | None = 3,
                 save_best_only: bool = False, monitor: str | None = None, mode: str = "auto",
                 async_save: bool = True, resume: bool = True, verbose: int = 0,
                 on_unreadable: str = "error") -> None:
        super().__init__()
        if on_unreadable not in ("error", "restart"):
            raise ValueError(f"on_unreadable must be 'error' or 'restart', got {on_unreadable!r}.")
        self.on_unreadable = on_unreadable
        if int(every_rounds) < 1:
            raise ValueError(f"every_rounds must be >= 1, got {every_rounds}.")
        if max_to_keep is not None and int(max_to_keep) < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}.")
        if save_best_only and not monitor:
            raise ValueError("save_best_only=True needs monitor= (e.g. monitor='val_loss'): "
                             "without it there is no 'best' to keep.")
        self.directory = absolute(directory)  # orbax needs absolute paths; the working directory may change
        self.every_rounds = int(every_rounds)
        self.max_to_keep = None if max_to_keep is None else int(max_to_keep)
        self.save_best_only = bool(save_best_only)
        self.monitor = monitor
        self._metric = MonitoredMetric("OrbaxCheckpoint(save_best_only=True)", monitor or "", mode)
        self.mode = self._metric.mode
        self.async_save = bool(async_save)
        self.resume = bool(resume)
        self.verbose = int(verbose)
        self.best: float | None = None
        self.restored_round: int | None = None
        self._manager = None
        self._lock = DirectoryLock(self.directory)
        self._pending_round: int | None = None  # the round a background save is writing

    # -------------------------------------------------------------- lifecycle
    def _check_writable(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe = self.directory / f".write-test-{os.getpid()}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:
            raise CheckpointError(f"checkpoint directory {self.directory} is not writable: "
                                  f"{e.strerror or e}. Choose a writable directory.") from e

    def _open(self):
        ocp = _ocp()
        self._check_writable()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.max_to_keep, create=True, cleanup_tmp_directories=True,
            enable_async_checkpointing=self.async_save,
            step_name_format=_own_steps_format(ocp.step.standard_name_format()))
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("server_state", "client_states", "callback_arrays", "metadata"))

    def on_train_begin(self, logs=None) -> None:
        self.restored_round = None
        self._check_writable()
        if _is_chief():  # one lock per run: the other processes of a multi-process run write with it
            self._lock.acquire()
        try:
            self._begin()
        except BaseException:
            self._abort()
            raise

    def _begin(self) -> None:
        if self.resume and self.trainer.round == 0 and _steps(self.directory):
            try:
                meta = restore_latest(self.trainer, self.directory, set_aside=True)
            except CheckpointUnreadableError as e:
                if self.on_unreadable != "restart":
                    raise
                set_aside_steps(self.directory, e.steps)
                warnings.warn(f"no readable checkpoint in {self.directory} (damaged steps "
                              f"{', '.join(map(str, e.steps))}, set aside as <step>.corrupt): training starts "
                              "over from round 0 as on_unreadable='restart' asks.", RuntimeWarning, stacklevel=2)
                meta = None
            if meta is not None:
                self.restored_round = int(meta["round"])
                best = meta.get("best")
                if best and best.get("monitor") == self.monitor:
                    self.best = best.get("value")
                log.info("restored %s (round %d)", self.directory, self.restored_round)
                if self.verbose:
                    print(f"Restored checkpoint {self.directory} at round {self.restored_round}.", flush=True)
        self._open()

    def on_round_end(self, round: int, logs=None) -> None:
        logs = logs or {}
        completed = round + 1
        last = completed >= int(self.params.get("rounds", completed)) or self.trainer.stop_training
        if completed % self.every_rounds and not last:
            return
        if not _finite_round(logs):
            warnings.warn(f"round {completed}: the loss is not finite, so it is not saved; the newest checkpoint "
                          f"in {self.directory} is round {latest_step(self.directory)}.", RuntimeWarning,
                          stacklevel=2)
            return
        if (getattr(self.trainer, "last_round_info", None) or {}).get("state_finite") is False:
            warnings.warn(f"round {completed}: the new server state holds NaN or inf, so it is not saved; the "
                          f"newest checkpoint in {self.directory} is round {latest_step(self.directory)}.",
                          RuntimeWarning, stacklevel=2)
            return
        if self.save_best_only:
            value = self._metric.read(logs)
            if value is None or not (math.isfinite(value) and self._metric.better(value, self.best)):
                return
            self.best = value
        self._save(round, logs)

    def _save(self, round: int, logs: dict) -> None:
        ocp = _ocp()
        trainer = self.trainer
        completed = round + 1
        ids, rows = _stack_clients(trainer)
        extra = {"best": {"monitor": self.monitor, "value": self.best} if self.monitor else None}
        meta = seal_metadata(_metadata(trainer, completed, _history_with(trainer, round, logs), ids, rows, extra))
        items = {"server_state": ocp.args.StandardSave(_server_tree(trainer)),
                 "metadata": ocp.args.JsonSave(meta)}
        if rows is not None:
            items["client_states"] = ocp.args.StandardSave(rows)
        arrays = _callback_arrays(trainer)
        if arrays:
            items["callback_arrays"] = ocp.args.StandardSave(arrays)
        self.wait_until_finished()  # a failed background save is reported for the round it was writing
        try:
            link = self.directory / str(completed)
            if link.is_symlink():  # not a step fedtrain wrote: remove the link itself, never its target
                warnings.warn(f"removing the symbolic link {link} (to {os.readlink(link)}) to save round "
                              f"{completed} there; its target is left as it is.", RuntimeWarning, stacklevel=3)
                link.unlink()
            if completed in (self._manager.all_steps() or []):
                self._manager.delete(completed)
            self._pending_round = completed
            self._manager.save(completed, args=ocp.args.Composite(**items), force=True)
            if not self.async_save:
                self._pending_round = None
        except KeyboardInterrupt:  # a second Ctrl-C / SIGTERM during the save
            self._abandon()
            raise
        except Exception as e:
            self._pending_round = None
            err = self._write_error(completed, e)
            self._abort()
            raise err from e
        if self.verbose:
            print(f"Round {completed}: saved checkpoint to {self.directory}.", flush=True)

    def _write_error(self, completed: int, e: BaseException) -> CheckpointError:
        cause, full = e, False
        seen = set()
        while cause is not None and id(cause) not in seen:
            seen.add(id(cause))
            if (isinstance(cause, OSError) and cause.errno == errno.ENOSPC) or any(
                    m in str(cause) for m in ("RESOURCE_EXHAUSTED", "No space left", "ENOSPC")):
                full = True
                break
            if isinstance(cause, OSError):
                break
            cause = cause.__cause__ or cause.__context__
        older = [s for s in _steps(self.directory) if s < completed]
        if full:
            try:
                free = f"{shutil.disk_usage(self.directory).free / 2**20:.1f} MiB free"
            except OSError:
                free = "free space unknown"
            return CheckpointError(
                f"could not save round {completed} to {self.directory}: the disk is full ({free}); free space or "
                f"lower max_to_keep. Older checkpoints are intact (steps: {older or 'none'}).")
        if isinstance(cause, OSError) and cause.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            hint = "the directory is not writable"
        else:
            hint = one_line(f"{type(e).__name__}: {e}", 300)
        return CheckpointError(f"could not save round {completed} to {self.directory}: {hint}.")

    def wait_until_finished(self) -> None:
        """Blocks until any background save is on disk."""
        if self._manager is not None:
            try:
                self._manager.wait_until_finished()
            except KeyboardInterrupt:  # a second Ctrl-C / SIGTERM while the save finishes
                self._abandon()
                raise
            except Exception as e:
                pending = self._pending_round
                self._pending_round = None
                err = self._write_error(pending if pending is not None else (self._manager.latest_step() or 0), e)
                self._abort()
                raise err from e
            self._pending_round = None

    def _abort(self) -> None:
        """After a failure: close orbax quietly (one error is reported, not its follow-ons), drop the lock."""
        manager, self._manager = self._manager, None
        try:
            if manager is not None:
                manager.close()
        except Exception as e:  # the first error is the one raised
            log.debug("closing the checkpoint manager after a failure: %s", one_line(str(e)))
        finally:  # also when a further signal interrupts the close
            self._lock.release()

    def _abandon(self) -> None:
        """A second signal: drop orbax without waiting for the write in flight (an uncommitted step is a
        temporary directory, never read and removed by the next run) and release the lock; finished steps
        are left as they are."""
        if self._pending_round is not None:
            log.info("abandoned the save of round %d in %s", self._pending_round, self.directory)
        self._manager, self._pending_round = None, None
        self._lock.release()

    def on_train_abort(self, wait: bool = True) -> None:
        """``fit`` ended by an exception (on_train_end does not run): close orbax (after a second signal,
        ``wait=False``: the save in flight is abandoned), release the lock."""
        if wait:
            self._abort()
        else:
            self._abandon()

    def on_train_end(self, logs=None) -> None:
        try:
            if self._manager is not None:
                self.wait_until_finished()
                if self._manager is not None:
                    self._manager.close()
                    self._manager = None
        finally:
            self._abort()

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best = state.get("best")


class BackupAndRestore(OrbaxCheckpoint):
    """Keras ``BackupAndRestore``: keeps the newest state in ``backup_dir`` while training runs,
    resumes from it after an interruption, and deletes it when training ends
    (``delete_checkpoint=True``). ``save_freq`` is ``'round'``/``'epoch'`` or a number of rounds."""

    def __init__(self, backup_dir: str | os.PathLike, save_freq: str | int = "round",
                 delete_checkpoint: bool = True, async_save: bool = True, on_unreadable: str = "error") -> None:
        if save_freq in ("round", "epoch"):
            every = 1
        elif isinstance(save_freq, int) and save_freq >= 1:
            every = save_freq
        else:
            raise ValueError(f"save_freq must be 'round', 'epoch' or an integer >= 1, got {save_freq!r}.")
        super().__init__(backup_dir, every_rounds=every, max_to_keep=1, async_save=async_save, resume=True,
                         on_unreadable=on_unreadable)
        self.delete_checkpoint = bool(delete_checkpoint)

    def on_train_end(self, logs=None) -> None:
        super().on_train_end(logs)
        if self.delete_checkpoint and self.directory.exists():
            shutil.rmtree(self.directory)


def _is_chief() -> bool:
    import jax

    return jax.process_index() == 0


def _finite_round(logs: dict) -> bool:
    if logs.get("num_clients", 1.0) == 0.0:
        return True
    for key in ("loss", "update_norm"):
        v = logs.get(key)
        if v is not None and not math.isfinite(float(v)):
            return False
    return True


__all__ = ["BackupAndRestore", "CheckpointCorruptError", "CheckpointError", "CheckpointLockedError",
           "CheckpointMismatchError", "CheckpointReadError", "CheckpointUnreadableError", "DirectoryLock",
           "OrbaxCheckpoint", "latest_step"]
