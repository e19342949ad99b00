"""Client samplers: pure functions of (seed, round), so any round can be replayed."""

from __future__ import annotations

import numpy as np


class UniformSampler:
    """Uniform sampling without replacement of ``k`` clients each round.

    ``sample(seed, round, population, k)`` returns population indices drawn from
    ``numpy.random.default_rng([seed, round, ...])``: the same arguments give the
    same cohort on any machine, and nothing depends on earlier rounds.
    """

    name = "uniform"

    def sample(self, seed: int, round_index: int, population: int, k: int) -> np.ndarray:
        if k > population:
            raise ValueError(
                f"clients_per_round={k} is larger than the {population} clients available; "
                f"use clients_per_round <= {population}.")
        rng = np.random.default_rng([int(seed), int(round_index), 0x5A])
        return rng.choice(population, size=k, replace=False)

    def sampling_probability(self, population: int, k: int) -> float:
        """Probability that a given client is in a round's cohort."""
        return k / population

    def __repr__(self) -> str:
        return "UniformSampler()"
