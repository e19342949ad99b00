"""Shakespeare next-character prediction (2x LSTM-256) with FedYogi.

Follows Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), Table 1 protocol and
best hyperparameters (client SGD lr 10^0, server lr 10^-2, eps 10^-3); expected accuracy 57.2 % (recalled from the paper, +-1 point),
the average over the last 100 rounds.
The default data is the offline Shakespeare (1,154 clients, not TFF's 715).
Variants: paper, official, demo, tiny (see ``recipes/_common.py``).
"""

from recipes._common import make


def get_config(variant: str = "paper"):
    return make("shakespeare", "fedyogi", variant, variants=('paper', 'official', 'demo', 'tiny'))
