"""Callbacks with Keras names and semantics."""

from fedtrain.callbacks.base import Callback, CallbackList, History, LambdaCallback
from fedtrain.callbacks.checkpoint import BackupAndRestore, CheckpointError, CheckpointMismatchError, OrbaxCheckpoint
from fedtrain.callbacks.csv_logger import CSVLogger, JSONLinesLogger
from fedtrain.callbacks.early_stopping import EarlyStopping, TerminateOnNaN
from fedtrain.callbacks.progress import ProgressBar
from fedtrain.callbacks.schedules import LearningRateScheduler, ReduceLROnPlateau
from fedtrain.callbacks.tensorboard import TensorBoard

ModelCheckpoint = OrbaxCheckpoint

__all__ = ["BackupAndRestore", "CSVLogger", "Callback", "CallbackList", "CheckpointError", "CheckpointMismatchError",
           "EarlyStopping", "History", "JSONLinesLogger", "LambdaCallback", "LearningRateScheduler",
           "ModelCheckpoint", "OrbaxCheckpoint", "ProgressBar", "ReduceLROnPlateau", "TensorBoard", "TerminateOnNaN"]
