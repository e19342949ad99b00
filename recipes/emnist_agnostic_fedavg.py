"""EMNIST-62 character recognition with Agnostic FedAvg over two writer domains.

Ro et al., "Communication-efficient agnostic federated averaging"
(Interspeech 2021; FedJAX ``agnostic_fed_avg``), after Mohri et al., "Agnostic
federated learning" (ICML 2019): domains are high-school (f2100-f2599) and
census writers (``domain_id`` from :func:`fedtrain.datasets.emnist.domain_id`),
initial weights 0.5 / 0.5. Reddi et al.'s EMNIST CR protocol and FedAvg rates;
the domain learning rate 0.1 is not from the paper. No expected accuracy.
Variants: paper, offline, demo, tiny.
"""

from recipes._common import make


def get_config(variant: str = "paper"):
    return make("emnist", "agnostic_fedavg", variant, hyper_from="fedavg", expected_accuracy=None,
                paper="Ro et al. 2021; Mohri et al. 2019",
                extra={"agnostic": {"init_domain_weights": (0.5, 0.5), "domain_learning_rate": 0.1,
                                    "domain_window_size": 1}},
                variants=("paper", "offline", "demo", "tiny"))
