"""Standard federated datasets: emnist, shakespeare, stackoverflow, cifar100, and an offline EMNIST-shaped task."""

from fedtrain.datasets import cifar100, emnist, emnist_like, shakespeare, stackoverflow

__all__ = ["cifar100", "emnist", "emnist_like", "shakespeare", "stackoverflow"]
