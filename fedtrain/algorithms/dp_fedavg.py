"""DP-FedAvg (McMahan et al., 2018) with fixed or adaptive clipping (Andrew et al., 2021).

FedAvg whose aggregator is ``chain(clip, gaussian_noise, mean(denominator=expected_clients))``:
client deltas are clipped to L2 norm ``C``, Gaussian noise ``N(0, (z C)^2)`` is added to their sum,
and the sum is divided by the fixed expected cohort size. ``noise_multiplier`` ``z`` is the one
the privacy accountant uses; with adaptive clipping part of the budget noises the clipped count.
"""

from __future__ import annotations

import optax

from fedtrain.aggregators import adaptive_clip, adaptive_noise_multiplier, chain, clip, gaussian_noise, mean
from fedtrain.algorithms.base import Algorithm, check_nonnegative
from fedtrain.algorithms.fedopt import fedopt


def dp_fedavg(client_tx: optax.GradientTransformation, noise_multiplier: float, clip_norm: float,
              expected_clients_per_round: float, server_learning_rate: float = 1.0, *,
              server_tx: optax.GradientTransformation | None = None, adaptive_clipping: bool = False,
              target_quantile: float = 0.5, clip_learning_rate: float = 0.2,
              count_stddev: float | None = None) -> Algorithm:
    """DP-FedAvg; ``clip_norm`` is the initial norm when ``adaptive_clipping``. The clipped-count
    noise ``count_stddev`` defaults to ``expected_clients_per_round / 20`` (the paper's choice), and to
    at least ``noise_multiplier`` so the update noise stays within 1.16x of it for small cohorts."""
    check_nonnegative(noise_multiplier=noise_multiplier, clip_norm=clip_norm,
                      server_learning_rate=server_learning_rate, clip_learning_rate=clip_learning_rate)
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}.")
    if not expected_clients_per_round > 0:
        raise ValueError(f"expected_clients_per_round must be > 0, got {expected_clients_per_round}.")
    z = float(noise_multiplier)
    if adaptive_clipping:
        s = max(expected_clients_per_round / 20, z) if count_stddev is None else float(count_stddev)
        if z == 0:
            s = 0.0
        clipper = adaptive_clip(clip_norm, target_quantile, clip_learning_rate, s, expected_clients_per_round)
        z_update = adaptive_noise_multiplier(z, s) if z > 0 else 0.0
    else:
        clipper, z_update = clip(clip_norm), z
    aggregator = chain(clipper, gaussian_noise(z_update), mean(denominator=expected_clients_per_round))
    hp = {"noise_multiplier": z, "clip_norm": float(clip_norm),
          "expected_clients_per_round": float(expected_clients_per_round), "adaptive_clipping": adaptive_clipping,
          "server_learning_rate": server_learning_rate}
    return fedopt(client_tx, server_tx or optax.sgd(server_learning_rate), aggregator=aggregator, name="dp_fedavg",
                  hyperparams=hp)
