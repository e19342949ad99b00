"""Privacy accounting for DP-FedAvg with the ``dp_accounting`` library.

Every round is a Gaussian mechanism with ``noise_multiplier`` ``z`` on clipped client updates,
applied to a cohort in which each client takes part with the sampler's sampling probability ``q``
(Poisson subsampling, add-or-remove-one-client adjacency). ``R`` rounds compose to
``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(z)), R)``; the RDP or PLD
accountant turns that into ``epsilon`` at a given ``delta``. For samplers that draw a fixed number
``k`` of ``N`` clients (e.g. ``UniformSampler``), ``q = k / N`` and the Poisson analysis is the
usual approximation (a fixed-size cohort is not a Poisson one, so the reported ``epsilon``
approximates the guarantee rather than bounding it); ``PoissonSampler`` matches it exactly.

``dp_accounting``'s RDP accountant logs absl warnings for orders whose series does not converge
(it leaves those orders out, so ``epsilon`` stays valid); :func:`quiet_accounting` silences them around
each accounting call only.
"""

from __future__ import annotations

import contextlib
import logging
import math

import dp_accounting

from fedtrain.callbacks.base import Callback

ACCOUNTANTS = ("rdp", "pld")


@contextlib.contextmanager
def quiet_accounting():
    """Raises the ``absl`` logger to ``ERROR`` while ``dp_accounting`` computes, then restores its level.

    The RDP accountant warns (through absl) about every fractional order whose series it cannot
    sum, several times per round; those orders are excluded and ``epsilon`` is still an upper bound
    over the remaining ones. Warnings logged outside the accounting are untouched."""
    logger = logging.getLogger("absl")
    level = logger.level
    if logger.getEffectiveLevel() < logging.ERROR:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check(noise_multiplier: float | None = None, sampling_probability: float | None = None,
           rounds: int | None = None, delta: float | None = None, accountant: str = "rdp") -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}.")
    if noise_multiplier is not None and not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}.")
    if sampling_probability is not None and not 0 < sampling_probability <= 1:
        raise ValueError(f"sampling_probability must be in (0, 1], got {sampling_probability}.")
    if rounds is not None and int(rounds) < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}.")
    if delta is not None and not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}.")


def round_event(noise_multiplier: float, sampling_probability: float) -> dp_accounting.DpEvent:
    """One round: the Gaussian mechanism on a Poisson-subsampled cohort."""
    return dp_accounting.PoissonSampledDpEvent(sampling_probability, dp_accounting.GaussianDpEvent(noise_multiplier))


def make_accountant(accountant: str = "rdp") -> dp_accounting.PrivacyAccountant:
    """A fresh ``dp_accounting`` RDP or PLD accountant."""
    _check(accountant=accountant)
    return dp_accounting.rdp.RdpAccountant() if accountant == "rdp" else dp_accounting.pld.PLDAccountant()


def compute_epsilon(noise_multiplier: float, sampling_probability: float, rounds: int, delta: float,
                    accountant: str = "rdp") -> float:
    """``epsilon`` after ``rounds`` rounds at ``delta``."""
    _check(noise_multiplier, sampling_probability, rounds, delta, accountant)
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    acc = make_accountant(accountant)
    with quiet_accounting():
        acc.compose(round_event(noise_multiplier, sampling_probability), int(rounds))
        return float(acc.get_epsilon(delta))


def noise_multiplier_for(epsilon: float, delta: float, rounds: int, sampling_probability: float,
                         accountant: str = "rdp", tol: float = 1e-4) -> float:
    """The smallest noise multiplier whose ``rounds`` rounds at ``sampling_probability`` spend at most
    ``epsilon`` at ``delta`` (within ``tol``)."""
    _check(None, sampling_probability, rounds, delta, accountant)
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"target epsilon must be a finite number > 0, got {epsilon}.")
    if int(rounds) < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}.")

    def event(z):
        return dp_accounting.SelfComposedDpEvent(round_event(z, sampling_probability), int(rounds))

    try:
        with quiet_accounting():
            z = dp_accounting.calibrate_dp_mechanism(
                lambda: make_accountant("rdp"), event, epsilon, delta,
                dp_accounting.LowerEndpointAndGuess(1e-3, 1.0), tol=tol)
    except dp_accounting.mechanism_calibration.NoBracketIntervalFoundError as e:
        raise ValueError(f"epsilon={epsilon} at delta={delta} over {rounds} rounds with sampling probability "
                         f"{sampling_probability} is unreachable with any noise multiplier.") from e
    if accountant == "pld":
        # PLD is tighter than RDP: search below the RDP answer (tiny multipliers make PLD huge).
        lower = z / 3
        if compute_epsilon(lower, sampling_probability, rounds, delta, "pld") <= epsilon:
            z = lower
        else:
            with quiet_accounting():
                z = dp_accounting.calibrate_dp_mechanism(
                    lambda: make_accountant("pld"), event, epsilon, delta,
                    dp_accounting.ExplicitBracketInterval(lower, z + tol), tol=tol)
    # calibrate returns a value within tol of the optimum; step up to one that meets the budget.
    while compute_epsilon(z, sampling_probability, rounds, delta, accountant) > epsilon:
        z += tol
    return float(z)


def check_expected_clients(expected_clients_per_round: float, sampling_probability: float, num_clients: int,
                           clients_per_round: int) -> None:
    """Raises ``ValueError`` when DP-FedAvg's fixed mean denominator ``expected_clients_per_round`` is not
    the expected cohort size ``q * num_clients`` (``clients_per_round`` for uniform sampling).

    The noised sum of the cohort's clipped updates is divided by that fixed number, so any other
    value scales every server update by ``cohort / expected_clients_per_round``. A difference of up to
    half a client (rounding ``q * N``) or 1 % is accepted."""
    m, q, n = float(expected_clients_per_round), float(sampling_probability), int(num_clients)
    expected = q * n
    if abs(m - expected) <= max(0.5, 0.01 * expected):
        return
    if math.isclose(expected, round(expected), rel_tol=1e-9) and math.isclose(q, clients_per_round / n, rel_tol=1e-9):
        cohort = f"clients_per_round={clients_per_round} (sampling rate q = {clients_per_round}/{n})"
    else:
        cohort = f"an expected cohort of q * num_clients = {q:.6g} * {n} = {expected:.6g}"
    raise ValueError(
        f"DPAccountant: the algorithm divides the noised sum of client updates by expected_clients_per_round="
        f"{m:g}, but rounds sample {cohort}: every server update is scaled by {expected / m:.3g}. Build the "
        f"algorithm with expected_clients_per_round={expected:g} (e.g. fedtrain.algorithms.dp_fedavg(..., "
        f"expected_clients_per_round={expected:g})), or pass DPAccountant(..., allow_expected_clients_mismatch=True) "
        "when the fixed denominator is intended.")


class DPAccountant(Callback):
    """Adds ``dp_epsilon`` (at ``delta``) to the logs after every round; with ``target_epsilon`` it stops
    training before a round that would exceed it.

    The noise multiplier defaults to the algorithm's ``hyperparams['noise_multiplier']`` (set by
    ``dp_fedavg``); the sampling probability comes from ``trainer.sampler.sampling_probability``.
    Before round 1 it checks that the algorithm's ``expected_clients_per_round`` (the fixed denominator
    of DP-FedAvg's mean) is the sampler's expected cohort, ``q * num_clients`` (``clients_per_round``
    for uniform sampling, ``q * N`` for ``PoissonSampler``); ``allow_expected_clients_mismatch=True``
    skips that check when a different denominator is intended.
    """

    def __init__(self, delta: float, target_epsilon: float | None = None, noise_multiplier: float | None = None,
                 accountant: str = "rdp", *, allow_expected_clients_mismatch: bool = False):
        super().__init__()
        _check(noise_multiplier, None, None, delta, accountant)
        if target_epsilon is not None and not target_epsilon > 0:
            raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}.")
        self.delta = float(delta)
        self.target_epsilon = target_epsilon
        self.noise_multiplier = noise_multiplier
        self.accountant = accountant
        self.allow_expected_clients_mismatch = bool(allow_expected_clients_mismatch)
        self.epsilon = 0.0
        self._acc = None
        self._event = None

    def _resolve(self) -> tuple[float, float]:
        trainer = self.trainer
        z = self.noise_multiplier
        if z is None:
            z = trainer.algorithm.hyperparams.get("noise_multiplier")
            if z is None:
                raise ValueError(f"DPAccountant: algorithm {trainer.algorithm.name!r} has no noise_multiplier; "
                                 "use fedtrain.algorithms.dp_fedavg or pass DPAccountant(noise_multiplier=...).")
        fn = getattr(trainer.sampler, "sampling_probability", None)
        if fn is None:
            raise ValueError(f"DPAccountant: sampler {trainer.sampler!r} has no sampling_probability(population, k); "
                             "privacy cannot be accounted for it.")
        n, k = self.params["num_clients"], self.params["clients_per_round"]
        q = float(fn(n, k))
        _check(float(z), q, None, self.delta, self.accountant)
        expected = trainer.algorithm.hyperparams.get("expected_clients_per_round")
        if expected is not None and not self.allow_expected_clients_mismatch:
            check_expected_clients(expected, q, n, k)
        return float(z), q

    def on_train_begin(self, logs=None):
        z, q = self._resolve()
        self._event = round_event(z, q)
        self._acc = None  # composed at the first round, when the starting round is final
        if self.target_epsilon is not None:
            first = compute_epsilon(z, q, 1, self.delta, self.accountant)
            if first > self.target_epsilon:
                raise ValueError(
                    f"DPAccountant: target_epsilon={self.target_epsilon} is unreachable: one round already gives "
                    f"epsilon={first:.4g} (noise_multiplier={z}, sampling probability {q:.4g}, delta={self.delta}). "
                    "Raise the noise multiplier (see fedtrain.privacy.noise_multiplier_for) or the target.")

    def on_round_begin(self, round, logs=None):
        if self._acc is None:  # rounds before this one (a continued or restored run) were spent already
            self._acc = make_accountant(self.accountant)
            if round:
                with quiet_accounting():
                    self._acc.compose(self._event, int(round))
        super().on_round_begin(round, logs)

    def on_round_end(self, round, logs=None):
        with quiet_accounting():
            self._acc.compose(self._event)
            self.epsilon = float(self._acc.get_epsilon(self.delta))
        if logs is not None:
            logs["dp_epsilon"] = self.epsilon
        if self.target_epsilon is not None:
            nxt = make_accountant(self.accountant)
            with quiet_accounting():
                nxt.compose(self._event, int(round) + 2)
                over = float(nxt.get_epsilon(self.delta)) > self.target_epsilon
            if over:
                self.trainer.stop_training = True
        super().on_round_end(round, logs)
