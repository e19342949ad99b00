"""EMNIST-62 character recognition with MimeLite (Karimireddy et al., "Breaking the centralized
barrier for cross-device federated learning", NeurIPS 2021).

The paper's EMNIST-62 experiments use SGD with momentum 0.9 as the base
optimizer; here under the Reddi et al. EMNIST CR protocol with FedAvgM's
client rate (10^-1.5) and server rate 1. The paper reports its numbers in
plots and tables not checked here: no expected accuracy is given.
Variants: paper, offline, demo, tiny.
"""

from recipes._common import make


def get_config(variant: str = "paper"):
    return make("emnist", "mime_lite", variant, hyper_from="fedavgm", expected_accuracy=None,
                paper="Karimireddy et al., Mime, NeurIPS 2021; protocol of Reddi et al. 2021",
                extra={"mime": {"base_momentum": 0.9, "client_delta_clip_norm": None}},
                variants=("paper", "offline", "demo", "tiny"))
