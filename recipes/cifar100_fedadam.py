"""CIFAR-100 image classification (ResNet-18 with GroupNorm, 24x24 crops) with FedAdam.

Follows Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), Table 1 protocol and
best hyperparameters (client SGD lr 10^-1.5, server lr 10^0, eps 10^-1); expected accuracy 52.5 %,
the average over the last 100 rounds.
Variants: paper, demo, tiny (see ``recipes/_common.py``).
"""

from recipes._common import make


def get_config(variant: str = "paper"):
    return make("cifar100", "fedadam", variant, variants=('paper', 'demo', 'tiny'))
