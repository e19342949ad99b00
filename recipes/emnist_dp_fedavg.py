"""EMNIST-62 character recognition with DP-FedAvg and adaptive clipping.

McMahan et al., "Learning differentially private recurrent language models"
(ICLR 2018) with the adaptive clipping of Andrew et al., "Differentially
private learning with adaptive clipping" (NeurIPS 2021): initial clip 0.1,
target quantile 0.5, clip learning rate 0.2, clipped-count noise
clients_per_round / 20. Cohort 100, noise multiplier 1.0, delta 1e-5 (epsilon
is logged as ``dp_epsilon``). Accuracy depends on the noise and cohort; no
expected value is given.
Variants: paper, offline, demo, tiny.
"""

from recipes._common import make


def get_config(variant: str = "paper"):
    config = make("emnist", "dp_fedavg", variant, hyper_from="fedavg", expected_accuracy=None,
                  paper="McMahan et al. 2018; Andrew et al. 2021 (adaptive clipping)",
                  extra={"clients_per_round": 100,
                         "dp": {"noise_multiplier": 1.0, "clip_norm": 0.1, "adaptive_clipping": True,
                                "target_quantile": 0.5, "clip_learning_rate": 0.2, "delta": 1e-5}},
                  variants=("paper", "offline", "demo", "tiny"))
    if variant == "demo":
        config.clients_per_round = 50
    if variant == "tiny":
        config.dp.noise_multiplier = 0.1  # adaptive clipping needs count noise > z / 2 with 2 clients
    return config
