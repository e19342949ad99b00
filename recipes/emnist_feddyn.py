"""EMNIST-62 character recognition with FedDyn (Acar et al., "Federated Learning Based on
Dynamic Regularization", ICLR 2021).

FedDyn's paper reports EMNIST-L and CIFAR results with its own protocol; this
recipe uses the Reddi et al. EMNIST CR protocol (CNN, 10 clients per round,
batch 20, 1,500 rounds, one local epoch) with FedAvg's tuned client rate
(SGD 10^-1) and alpha = 10^-2, not tuned for this protocol. No published
accuracy for this setup: FedAvg's 84.9 % is the bar.
Variants: paper, offline, demo, tiny.
"""

from recipes._common import make


def get_config(variant: str = "paper"):
    return make("emnist", "feddyn", variant, hyper_from="fedavg", expected_accuracy=None,
                paper="Acar et al., FedDyn, ICLR 2021; protocol of Reddi et al. 2021",
                extra={"feddyn": {"alpha": 0.01}}, variants=("paper", "offline", "demo", "tiny"))
