"""Stack Overflow next-word prediction (LSTM-670, vocabulary 10k) with FedAdam.

Follows Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), Table 1 protocol and
best hyperparameters (client SGD lr 10^-0.5, server lr 10^-2, eps 10^-5); expected accuracy 25.2 % (recalled from the paper, +-1 point),
the average over the last 100 rounds.
``get_config('fedjax')``: FedJAX's STACKOVERFLOW_WORD flags.
Variants: paper, fedjax, demo, tiny (see ``recipes/_common.py``).
"""

from recipes._common import make


def get_config(variant: str = "paper"):
    return make("stackoverflow", "fedadam", variant, variants=('paper', 'fedjax', 'demo', 'tiny'))
