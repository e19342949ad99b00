"""Callbacks with Keras names and semantics."""

from fedtrain.callbacks.base import Callback, CallbackList, History, LambdaCallback
from fedtrain.callbacks.checkpoint import (BackupAndRestore, CheckpointCorruptError, CheckpointError,
                                          CheckpointLockedError, CheckpointMismatchError, CheckpointReadError,
                                          CheckpointUnreadableError, OrbaxCheckpoint)
from fedtrain.callbacks.csv_logger import CSVLogger, JSONLinesLogger
from fedtrain.callbacks.early_stopping import EarlyStopping, TerminateOnNaN
from fedtrain.callbacks.progress import ProgressBar
from fedtrain.callbacks.schedules import LearningRateScheduler, ReduceLROnPlateau
from fedtrain.callbacks.tensorboard import TensorBoard

ModelCheckpoint = OrbaxCheckpoint

__all__ = ["BackupAndRestore", "CSVLogger", "Callback", "CallbackList", "CheckpointCorruptError", "CheckpointError",
           "CheckpointLockedError", "CheckpointMismatchError", "CheckpointReadError", "CheckpointUnreadableError",
           "EarlyStopping", "History", "JSONLinesLogger", "LambdaCallback", "LearningRateScheduler",
           "ModelCheckpoint", "OrbaxCheckpoint", "ProgressBar", "ReduceLROnPlateau", "TensorBoard", "TerminateOnNaN"]
