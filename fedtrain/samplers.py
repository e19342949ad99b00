"""Client samplers: pure functions of (seed, round), so any round can be replayed.

A sampler has ``sample(seed, round, population, k) -> indices`` and
``max_cohort(population, k)``, the largest cohort it can return (the trainer
compiles the round for that many clients; smaller cohorts are padded and
masked). A sampler that needs the clients' sizes or ids has ``bind(ids, sizes)``,
which the trainer calls before sampling.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def _rng(seed: int, round_index: int, tag: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(round_index), tag])


def _check_k(k: int, population: int) -> None:
    if k > population:
        raise ValueError(
            f"clients_per_round={k} is larger than the {population} clients available; "
            f"use clients_per_round <= {population}.")


class UniformSampler:
    """Uniform sampling without replacement of ``k`` clients each round.

    ``sample(seed, round, population, k)`` returns population indices drawn from
    ``numpy.random.default_rng([seed, round, ...])``: the same arguments give the
    same cohort on any machine, and nothing depends on earlier rounds.
    """

    name = "uniform"

    def sample(self, seed: int, round_index: int, population: int, k: int) -> np.ndarray:
        _check_k(k, population)
        rng = _rng(seed, round_index, 0x5A)
        return rng.choice(population, size=k, replace=False)

    def max_cohort(self, population: int, k: int) -> int:
        return int(k)

    def sampling_probability(self, population: int, k: int) -> float:
        """Probability that a given client is in a round's cohort."""
        return k / population

    def __repr__(self) -> str:
        return "UniformSampler()"


class PoissonSampler:
    """Each client takes part independently with probability ``q`` (the cohort size varies).

    The round is compiled for ``max_clients`` clients (default: the mean plus six
    standard deviations); smaller cohorts are padded and masked, and a cohort
    larger than ``max_clients`` is an error (with the default, about once in 10^9 rounds).
    ``clients_per_round`` is ignored. This is the sampling that DP accounting by
    Poisson subsampling assumes. A round may have no clients; its loss is NaN and
    the model does not change.
    """

    name = "poisson"

    def __init__(self, q: float, max_clients: int | None = None):
        if not 0.0 < float(q) <= 1.0:
            raise ValueError(f"PoissonSampler needs 0 < q <= 1, got q={q}.")
        if max_clients is not None and int(max_clients) < 1:
            raise ValueError(f"max_clients must be >= 1, got {max_clients}.")
        self.q = float(q)
        self.max_clients = None if max_clients is None else int(max_clients)

    def max_cohort(self, population: int, k: int | None = None) -> int:
        if self.max_clients is not None:
            return min(self.max_clients, population)
        mean = population * self.q
        return max(1, min(population, math.ceil(mean + 6.0 * math.sqrt(mean * (1.0 - self.q)) + 1)))

    def sample(self, seed: int, round_index: int, population: int, k: int | None = None) -> np.ndarray:
        rng = _rng(seed, round_index, 0x9A)
        chosen = np.flatnonzero(rng.random(population) < self.q)
        cap = self.max_cohort(population)
        if chosen.size > cap:
            raise ValueError(f"round {round_index + 1}: Poisson sampling drew {chosen.size} clients, more than "
                             f"max_clients={cap}; pass a larger PoissonSampler(q, max_clients=...).")
        return chosen

    def sampling_probability(self, population: int, k: int | None = None) -> float:
        return self.q

    def __repr__(self) -> str:
        return f"PoissonSampler(q={self.q})"


class WeightedSampler:
    """``k`` clients without replacement, with probability proportional to a weight.

    ``weights`` is ``"num_examples"`` (the default: clients' sizes), an array over
    the population in ``client_ids`` order, or a ``{client_id: weight}`` mapping
    (missing clients weigh 0). Clients with weight 0 are never sampled.
    """

    name = "weighted"

    def __init__(self, weights: str | Sequence[float] | Mapping[str, float] | np.ndarray = "num_examples"):
        if isinstance(weights, str) and weights != "num_examples":
            raise ValueError(f"weights must be 'num_examples', an array or a mapping; got {weights!r}.")
        self.weights = weights
        self._p: np.ndarray | None = None
        if not isinstance(weights, (str, Mapping)):
            self._p = self._normalise(np.asarray(weights, np.float64))

    @staticmethod
    def _normalise(w: np.ndarray) -> np.ndarray:
        if w.ndim != 1 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError("sampler weights must be finite, >= 0, and not all 0.")
        return w / w.sum()

    def bind(self, ids: Sequence[str], sizes: np.ndarray) -> None:
        if isinstance(self.weights, str):
            self._p = self._normalise(np.asarray(sizes, np.float64))
        elif isinstance(self.weights, Mapping):
            self._p = self._normalise(np.asarray([float(self.weights.get(c, 0.0)) for c in ids]))

    def max_cohort(self, population: int, k: int) -> int:
        return int(k)

    def sample(self, seed: int, round_index: int, population: int, k: int) -> np.ndarray:
        _check_k(k, population)
        if self._p is None:
            raise ValueError("WeightedSampler with 'num_examples' or a mapping needs bind(ids, sizes) first "
                             "(the trainer calls it).")
        if self._p.size != population:
            raise ValueError(f"WeightedSampler has {self._p.size} weights for a population of {population} clients.")
        if np.count_nonzero(self._p) < k:
            raise ValueError(f"only {np.count_nonzero(self._p)} clients have weight > 0; cannot sample {k}.")
        rng = _rng(seed, round_index, 0x77)
        return rng.choice(population, size=k, replace=False, p=self._p)

    def __repr__(self) -> str:
        return f"WeightedSampler({self.weights if isinstance(self.weights, str) else '...'})"


def max_cohort(sampler, population: int, k: int) -> int:
    """The largest cohort ``sampler`` may draw (``k`` for samplers without ``max_cohort``)."""
    fn = getattr(sampler, "max_cohort", None)
    return int(fn(population, k)) if fn is not None else int(k)


__all__ = ["PoissonSampler", "UniformSampler", "WeightedSampler", "max_cohort"]
