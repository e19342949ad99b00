"""Stack Overflow next-word prediction (LSTM-670, vocabulary 10k) with FedAvgM (server momentum 0.9).

Follows Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), Table 1 protocol and
best hyperparameters (client SGD lr 10^-0.5, server lr 10^0); expected accuracy 23.8 % (recalled from the paper, +-1 point),
the average over the last 100 rounds.
Variants: paper, demo, tiny (see ``recipes/_common.py``).
"""

from recipes._common import make


def get_config(variant: str = "paper"):
    return make("stackoverflow", "fedavgm", variant, variants=('paper', 'demo', 'tiny'))
