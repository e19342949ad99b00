"""EMNIST-62 character recognition (CNN with dropout) with FedAvg.

Follows Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), Table 1 protocol and
best hyperparameters (client SGD lr 10^-1, server lr 10^0); expected accuracy 84.9 %,
the average over the last 100 rounds.
Variants: paper, offline, demo, tiny (see ``recipes/_common.py``).
"""

from recipes._common import make


def get_config(variant: str = "paper"):
    return make("emnist", "fedavg", variant, variants=('paper', 'offline', 'demo', 'tiny'))
