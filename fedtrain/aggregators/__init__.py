"""Aggregators: how client updates become one server update, composable with :func:`chain`.

>>> chain(clip(1.0), gaussian_noise(1.1), mean(denominator=100))   # DP-FedAvg
>>> chain(rotated_quantization(16), weighted_mean())                # compressed FedAvg
>>> chain(clip(1.0), trimmed_mean(0.1))                             # Byzantine-robust mean
"""

from fedtrain.aggregators.base import Aggregator, Stage, chain, global_norm, transform
from fedtrain.aggregators.compression import (binary_quantization, rotated_quantization, uniform_quantization,
                                              uniform_stochastic_quantize)
from fedtrain.aggregators.means import mean, weighted_mean
from fedtrain.aggregators.privacy import (adaptive_clip, adaptive_noise_multiplier, clip, clip_by_norm,
                                          gaussian_noise)
from fedtrain.aggregators.robust import median, trimmed_mean

__all__ = ["Aggregator", "Stage", "adaptive_clip", "adaptive_noise_multiplier", "binary_quantization", "chain",
           "clip", "clip_by_norm", "gaussian_noise", "global_norm", "mean", "median", "rotated_quantization",
           "transform", "trimmed_mean", "uniform_quantization", "uniform_stochastic_quantize", "weighted_mean"]
