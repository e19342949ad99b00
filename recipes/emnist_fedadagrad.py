"""EMNIST-62 character recognition (CNN with dropout) with FedAdagrad.

Follows Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), Table 1 protocol and
best hyperparameters (client SGD lr 10^-1.5, server lr 10^-1, eps 10^-2); expected accuracy 85.1 % (recalled from the paper, +-1 point),
the average over the last 100 rounds.
``get_config('fedjax')``: FedJAX's EMNIST_LOGISTIC (logistic model) flags.
Variants: paper, fedjax, offline, demo, tiny (see ``recipes/_common.py``).
"""

from recipes._common import make


def get_config(variant: str = "paper"):
    return make("emnist", "fedadagrad", variant, variants=('paper', 'fedjax', 'offline', 'demo', 'tiny'))
