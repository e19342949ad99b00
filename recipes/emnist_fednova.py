"""EMNIST-62 character recognition with FedNova (Wang et al., "Tackling the Objective
Inconsistency Problem in Heterogeneous Federated Optimization", NeurIPS 2020).

FedNova's paper runs CIFAR-10 and a synthetic task; this recipe uses the Reddi
et al. EMNIST CR protocol (CNN, 10 clients per round, batch 20, 1,500 rounds,
one local epoch, so clients of different sizes take different numbers of local
steps) with FedAvg's tuned rates (client SGD 10^-1, server 1). No published
accuracy for this setup: FedAvg's 84.9 % is the bar.
Variants: paper, offline, demo, tiny.
"""

from recipes._common import make


def get_config(variant: str = "paper"):
    return make("emnist", "fednova", variant, hyper_from="fedavg", expected_accuracy=None,
                paper="Wang et al., FedNova, NeurIPS 2020; protocol of Reddi et al. 2021",
                variants=("paper", "offline", "demo", "tiny"))
