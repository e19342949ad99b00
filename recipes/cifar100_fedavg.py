"""CIFAR-100 image classification (ResNet-18 with GroupNorm, 24x24 crops) with FedAvg.

Follows Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), Table 1 protocol and
best hyperparameters (client SGD lr 10^-1, server lr 10^0.5); expected accuracy 44.7 %,
the average over the last 100 rounds.
Variants: paper, demo, tiny (see ``recipes/_common.py``).
"""

from recipes._common import make


def get_config(variant: str = "paper"):
    return make("cifar100", "fedavg", variant, variants=('paper', 'demo', 'tiny'))
