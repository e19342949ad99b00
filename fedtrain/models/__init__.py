"""Flax nnx models of the standard federated tasks."""

from fedtrain.models import adapter, cifar, emnist, lstm, shakespeare, stackoverflow
from fedtrain.models.adapter import Model, from_nnx
from fedtrain.models.cifar import CifarLogistic, ResNet18, cifar_model
from fedtrain.models.emnist import EmnistCNN, EmnistDense, EmnistLogistic, emnist_model
from fedtrain.models.lstm import LSTMLayer, StackedLSTM
from fedtrain.models.shakespeare import ShakespeareLSTM, shakespeare_model
from fedtrain.models.stackoverflow import StackOverflowLSTM, stackoverflow_model

__all__ = [
    "adapter", "emnist", "lstm", "shakespeare", "Model", "from_nnx", "EmnistCNN", "EmnistDense", "EmnistLogistic",
    "emnist_model", "LSTMLayer", "StackedLSTM", "ShakespeareLSTM", "shakespeare_model",
    "cifar", "stackoverflow", "ResNet18", "CifarLogistic", "cifar_model", "StackOverflowLSTM", "stackoverflow_model",
]
