"""EMNIST-62 character recognition (CNN with dropout) with FedAdam.

Follows Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), Table 1 protocol and
best hyperparameters (client SGD lr 10^-1.5, server lr 10^-2.5, eps 10^-4); expected accuracy 85.6 % (recalled from the paper, +-1 point),
the average over the last 100 rounds.
``get_config('fedjax')``: FedJAX's EMNIST_CONV flags.
Variants: paper, fedjax, offline, demo, tiny (see ``recipes/_common.py``).
"""

from recipes._common import make


def get_config(variant: str = "paper"):
    return make("emnist", "fedadam", variant, variants=('paper', 'fedjax', 'offline', 'demo', 'tiny'))
