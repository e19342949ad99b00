"""EMNIST-62 character recognition (CNN with dropout) with FedYogi.

Follows Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), Table 1 protocol and
best hyperparameters (client SGD lr 10^-1.5, server lr 10^-2.5, eps 10^-4); expected accuracy 85.5 % (recalled from the paper, +-1 point),
the average over the last 100 rounds.
Variants: paper, offline, demo, tiny (see ``recipes/_common.py``).
"""

from recipes._common import make


def get_config(variant: str = "paper"):
    return make("emnist", "fedyogi", variant, variants=('paper', 'offline', 'demo', 'tiny'))
