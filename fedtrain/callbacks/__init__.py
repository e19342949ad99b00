"""Callbacks with Keras names and semantics."""

from fedtrain.callbacks.base import Callback, CallbackList, History, LambdaCallback
from fedtrain.callbacks.progress import ProgressBar

__all__ = ["Callback", "CallbackList", "History", "LambdaCallback", "ProgressBar"]
