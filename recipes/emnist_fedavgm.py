"""EMNIST-62 character recognition (CNN with dropout) with FedAvgM (server momentum 0.9).

Follows Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), Table 1 protocol and
best hyperparameters (client SGD lr 10^-1.5, server lr 10^-0.5); expected accuracy 85.2 % (recalled from the paper, +-1 point),
the average over the last 100 rounds.
Variants: paper, offline, demo, tiny (see ``recipes/_common.py``).
"""

from recipes._common import make


def get_config(variant: str = "paper"):
    return make("emnist", "fedavgm", variant, variants=('paper', 'offline', 'demo', 'tiny'))
