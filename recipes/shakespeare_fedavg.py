"""Shakespeare next-character prediction with FedAvg.

Follows Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), Table 1 /
Appendix: 2-layer LSTM-256, 10 clients per round, batch 4, 1 local epoch,
client SGD lr 1 (10^0), server SGD lr 1 (10^0), 1,200 rounds; reported test
accuracy 56.9 % on TFF's 715-client split. The offline data here has 1,154
clients (speaking roles of the 38 plays), so numbers are comparable, not equal.

``get_config('demo')`` is the few-minute CPU demo run by the README;
``'fedjax'`` uses FedJAX's SHAKESPEARE_CHARACTER flags; ``'official'`` TFF's
split (download); ``'tiny'`` is the test-suite run.
Variants: paper, fedjax, official, demo, tiny.
"""

from recipes._common import make


def get_config(variant: str = "paper"):
    return make("shakespeare", "fedavg", variant, variants=("paper", "fedjax", "official", "demo", "tiny"))
