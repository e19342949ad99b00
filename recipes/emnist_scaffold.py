"""EMNIST-62 character recognition with SCAFFOLD (Karimireddy et al., ICML 2020).

SCAFFOLD's paper runs EMNIST with a logistic model under controlled similarity;
this recipe uses the Reddi et al. EMNIST CR protocol (CNN, 10 clients per
round, batch 20, 1,500 rounds) with FedAvg's tuned rates (client SGD 10^-1,
server 1). No published accuracy for this setup: FedAvg's 84.9 % is the bar.
Variants: paper, offline, demo, tiny.
"""

from recipes._common import make


def get_config(variant: str = "paper"):
    return make("emnist", "scaffold", variant, hyper_from="fedavg", expected_accuracy=None,
                paper="Karimireddy et al., SCAFFOLD, ICML 2020; protocol of Reddi et al. 2021",
                variants=("paper", "offline", "demo", "tiny"))
