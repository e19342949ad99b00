"""Aggregators: means, chains, clipping, Gaussian noise, adaptive clipping, quantization."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedtrain import aggregators as agg


def run(aggregator, updates, weights, seed=0, state=None):
    """Aggregates a list of client updates the way the engine does: sum of contributions, then finalize."""
    key = jax.random.key(seed)
    state = aggregator.init(updates[0]) if state is None else state
    total = None
    for i, (u, w) in enumerate(zip(updates, weights)):
        c = aggregator.contribution(u, jnp.float32(w), jax.random.fold_in(key, i), state)
        total = c if total is None else jax.tree.map(jnp.add, total, c)
    return aggregator.finalize(total, jax.random.fold_in(key, 999), state)


def test_weighted_and_uniform_means():
    ups = [{"a": jnp.array([1.0, 2.0])}, {"a": jnp.array([3.0, 6.0])}, {"a": jnp.array([100.0, 100.0])}]
    out, _, _ = run(agg.weighted_mean(), ups, [1.0, 3.0, 0.0])
    np.testing.assert_allclose(out["a"], [2.5, 5.0])
    out, _, _ = run(agg.mean(), ups, [1.0, 3.0, 0.0])
    np.testing.assert_allclose(out["a"], [2.0, 4.0])
    out, _, _ = run(agg.mean(denominator=4), ups, [1.0, 3.0, 0.0])
    np.testing.assert_allclose(out["a"], [1.0, 2.0])


def test_chain_validates_structure():
    with pytest.raises(ValueError, match="must end with a mean"):
        agg.chain(agg.clip(1.0))
    with pytest.raises(ValueError, match="exactly one mean"):
        agg.chain(agg.mean(), agg.weighted_mean())
    with pytest.raises(ValueError, match="needs a clip"):
        agg.chain(agg.gaussian_noise(1.0), agg.mean())
    with pytest.raises(ValueError, match="not private"):
        agg.chain(agg.clip(1.0), agg.gaussian_noise(1.0), agg.weighted_mean())
    with pytest.raises(TypeError):
        agg.chain(lambda x: x, agg.mean())
    for bad in (lambda: agg.clip(-1.0), lambda: agg.gaussian_noise(-0.1), lambda: agg.mean(denominator=0),
                lambda: agg.adaptive_clip(1.0, target_quantile=1.5), lambda: agg.uniform_quantization(1)):
        with pytest.raises(ValueError):
            bad()


def test_clip_then_mean():
    ups = [{"a": jnp.array([3.0, 4.0])}, {"a": jnp.array([0.3, 0.4])}]
    out, _, metrics = run(agg.chain(agg.clip(1.0), agg.mean()), ups, [5.0, 7.0])
    np.testing.assert_allclose(out["a"], [(0.6 + 0.3) / 2, (0.8 + 0.4) / 2], rtol=1e-6)
    assert float(metrics["clipped_fraction"]) == 0.5


def test_gaussian_noise_std_and_reproducibility():
    clip_norm, z, m = 2.0, 1.5, 10.0
    dp = agg.chain(agg.clip(clip_norm), agg.gaussian_noise(z), agg.mean(denominator=m))
    ups = [{"a": jnp.zeros((20000,)), "b": jnp.zeros((5000,))}]
    out1, _, metrics = run(dp, ups, [1.0], seed=3)
    out2, _, _ = run(dp, ups, [1.0], seed=3)
    out3, _, _ = run(dp, ups, [1.0], seed=4)
    np.testing.assert_array_equal(out1["a"], out2["a"])
    assert not np.allclose(out1["a"], out3["a"])
    noise = np.concatenate([np.asarray(out1["a"]), np.asarray(out1["b"])])
    assert abs(noise.mean()) < 0.01
    assert noise.std() == pytest.approx(z * clip_norm / m, rel=0.02)
    assert float(metrics["noise_stddev"]) == pytest.approx(z * clip_norm)


def test_adaptive_clip_moves_toward_quantile():
    ac = agg.chain(agg.adaptive_clip(1.0, target_quantile=0.5, learning_rate=0.2), agg.mean())
    norms = [0.1, 0.2, 5.0, 6.0, 7.0]
    ups = [{"a": jnp.array([n])} for n in norms]
    state = ac.init(ups[0])
    out, state, metrics = run(ac, ups, [1.0] * 5, state=state)
    assert float(metrics["clip_norm"]) == 1.0
    # 2 of 5 unclipped: C <- C exp(-0.2 (0.4 - 0.5))
    assert float(state[0]) == pytest.approx(np.exp(0.02), rel=1e-6)
    np.testing.assert_allclose(out["a"], [(0.1 + 0.2 + 3.0) / 5], rtol=1e-6)
    for _ in range(60):
        _, state, _ = run(ac, ups, [1.0] * 5, state=state)
    assert 0.2 < float(state[0]) <= 5.0 + 1e-3
    assert agg.adaptive_noise_multiplier(1.0, 0.0) == 1.0
    z = agg.adaptive_noise_multiplier(1.0, 2.0)
    assert (z ** -2 + (2 * 2.0) ** -2) ** -0.5 == pytest.approx(1.0)
    with pytest.raises(ValueError, match="too small"):
        agg.adaptive_noise_multiplier(1.0, 0.4)


@pytest.mark.parametrize("stage,levels,rotated", [
    (agg.uniform_quantization(4), 4, False),
    (agg.binary_quantization(), 2, False),
    (agg.rotated_quantization(8), 8, True),
])
def test_quantization_is_unbiased_and_reports_bits(stage, levels, rotated):
    rng = np.random.default_rng(0)
    u = {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32), "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
    q = agg.chain(stage, agg.mean())
    outs = [run(q, [u], [1.0], seed=s)[0] for s in range(400)]
    mean = jax.tree.map(lambda *xs: np.mean(xs, axis=0), *outs)
    np.testing.assert_allclose(mean["w"], u["w"], atol=0.2)
    single, _, metrics = run(q, [u], [1.0], seed=1)
    if not rotated:  # every coordinate is one of the levels between min and max
        w = np.asarray(u["w"])
        grid = w.min() + np.arange(levels) / (levels - 1) * (w.max() - w.min())
        assert np.all(np.min(np.abs(np.asarray(single["w"])[..., None] - grid), axis=-1) < 1e-5)
    coords = (16 + 4) if rotated else (15 + 3)
    assert float(metrics["bits_per_client"]) == pytest.approx(np.log2(levels) * coords + 64 * 2)


def test_hadamard_rotation_is_orthogonal():
    from fedtrain.aggregators.compression import fwht
    x = jnp.asarray(np.random.default_rng(1).normal(size=16), jnp.float32)
    np.testing.assert_allclose(fwht(fwht(x)) / 16, x, atol=1e-5)
    h = np.array([np.asarray(fwht(jnp.eye(8)[i])) for i in range(8)])
    np.testing.assert_allclose(h @ h.T, 8 * np.eye(8), atol=1e-5)


def test_stateful_aggregator_needs_state():
    ac = agg.chain(agg.adaptive_clip(1.0), agg.mean())
    assert ac.stateful and not agg.weighted_mean().stateful
    with pytest.raises(ValueError, match="keeps state"):
        ac.contribution({"a": jnp.ones(2)}, jnp.float32(1), jax.random.key(0))
