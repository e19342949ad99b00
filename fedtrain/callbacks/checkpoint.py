"""OrbaxCheckpoint and BackupAndRestore: save rounds with orbax, resume exactly after a crash.

What a checkpoint holds and how it is read back is :mod:`fedtrain.checkpoint_format`.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import warnings

from fedtrain.callbacks.base import Callback
from fedtrain.callbacks.early_stopping import MonitoredMetric
from fedtrain.checkpoint_format import (CheckpointCorruptError, CheckpointError, CheckpointMismatchError,
                                        CheckpointReadError, _callback_arrays, _history_with, _metadata, _ocp,
                                        _server_tree, _stack_clients, _steps, absolute, latest_step, log,
                                        restore_latest)

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
    A round whose loss is not finite is never saved. ``directory`` may be relative (to the
    working directory when the callback is created).
    """

    runs_late = True

    def __init__(self, directory: str | os.PathLike, *, every_rounds: int = 1, max_to_keep: int | None = 3,
                 save_best_only: bool = False, monitor: str | None = None, mode: str = "auto",
                 async_save: bool = True, resume: bool = True, verbose: int = 0) -> None:
        super().__init__()
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
            enable_async_checkpointing=self.async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("server_state", "client_states", "callback_arrays", "metadata"))

    def on_train_begin(self, logs=None) -> None:
        self.restored_round = None
        if self.resume and self.trainer.round == 0 and _steps(self.directory):
            meta = restore_latest(self.trainer, self.directory, set_aside=True)
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
        meta = _metadata(trainer, completed, _history_with(trainer, round, logs), ids, rows, extra)
        items = {"server_state": ocp.args.StandardSave(_server_tree(trainer)),
                 "metadata": ocp.args.JsonSave(meta)}
        if rows is not None:
            items["client_states"] = ocp.args.StandardSave(rows)
        arrays = _callback_arrays(trainer)
        if arrays:
            items["callback_arrays"] = ocp.args.StandardSave(arrays)
        try:
            if completed in (self._manager.all_steps() or []):
                self._manager.delete(completed)
            self._manager.save(completed, args=ocp.args.Composite(**items), force=True)
        except Exception as e:
            raise self._write_error(completed, e) from e
        if self.verbose:
            print(f"Round {completed}: saved checkpoint to {self.directory}.", flush=True)

    def _write_error(self, completed: int, e: BaseException) -> CheckpointError:
        cause = e
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            hint = "the disk is full; free space or lower max_to_keep"
        elif isinstance(cause, OSError) and cause.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            hint = "the directory is not writable"
        else:
            hint = f"{type(e).__name__}: {e}"
        return CheckpointError(f"could not save round {completed} to {self.directory}: {hint}.")

    def wait_until_finished(self) -> None:
        """Blocks until any background save is on disk."""
        if self._manager is not None:
            try:
                self._manager.wait_until_finished()
            except Exception as e:
                raise self._write_error(self._manager.latest_step() or 0, e) from e

    def on_train_end(self, logs=None) -> None:
        if self._manager is not None:
            try:
                self.wait_until_finished()
            finally:
                self._manager.close()
                self._manager = None

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best = state.get("best")


class BackupAndRestore(OrbaxCheckpoint):
    """Keras ``BackupAndRestore``: keeps the newest state in ``backup_dir`` while training runs,
    resumes from it after an interruption, and deletes it when training ends
    (``delete_checkpoint=True``). ``save_freq`` is ``'round'``/``'epoch'`` or a number of rounds."""

    def __init__(self, backup_dir: str | os.PathLike, save_freq: str | int = "round",
                 delete_checkpoint: bool = True, async_save: bool = True) -> None:
        if save_freq in ("round", "epoch"):
            every = 1
        elif isinstance(save_freq, int) and save_freq >= 1:
            every = save_freq
        else:
            raise ValueError(f"save_freq must be 'round', 'epoch' or an integer >= 1, got {save_freq!r}.")
        super().__init__(backup_dir, every_rounds=every, max_to_keep=1, async_save=async_save, resume=True)
        self.delete_checkpoint = bool(delete_checkpoint)

    def on_train_end(self, logs=None) -> None:
        super().on_train_end(logs)
        if self.delete_checkpoint and self.directory.exists():
            shutil.rmtree(self.directory)


def _finite_round(logs: dict) -> bool:
    if logs.get("num_clients", 1.0) == 0.0:
        return True
    for key in ("loss", "update_norm"):
        v = logs.get(key)
        if v is not None and not math.isfinite(float(v)):
            return False
    return True


__all__ = ["BackupAndRestore", "CheckpointCorruptError", "CheckpointError", "CheckpointMismatchError",
           "CheckpointReadError", "OrbaxCheckpoint", "latest_step"]
