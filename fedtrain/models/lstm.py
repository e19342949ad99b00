"""Multi-layer LSTM as flax nnx modules.

Each layer computes the input projection ``x @ W_ih + b`` for all timesteps in
one matmul, then runs a single ``jax.lax.scan`` over time whose body does one
fused ``h @ W_hh`` matmul for the four gates. Gate order is (i, f, g, o); one
bias of size ``4H`` per layer, so a layer has ``4 * (F*H + H*H + H)``
parameters, as a standard LSTM.

Initialisation follows ``flax.linen.OptimizedLSTMCell``: LeCun normal input
kernel, an orthogonal ``H x H`` recurrent kernel per gate, zero bias, except
that the forget-gate bias starts at ``forget_bias`` (1.0 by default).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def _orthogonal_per_gate(key: jax.Array, hidden_size: int, dtype=jnp.float32) -> jax.Array:
    """``[H, 4H]``: four independent orthogonal ``H x H`` blocks side by side."""
    init = jax.nn.initializers.orthogonal()
    keys = jax.random.split(key, 4)
    return jnp.concatenate([init(k, (hidden_size, hidden_size), dtype) for k in keys], axis=1)


def lstm_scan(xw: jax.Array, w_hh: jax.Array, h0: jax.Array, c0: jax.Array, unroll: int = 1):
    """Runs the recurrence over time-major pre-activations ``xw`` ``[T, B, 4H]``.

    Returns ``(outputs [T, B, H], (h_T, c_T))``.
    """
    hidden = w_hh.shape[0]

    def step(carry, xw_t):
        h, c = carry
        z = xw_t + h @ w_hh
        i = jax.nn.sigmoid(z[..., :hidden])
        f = jax.nn.sigmoid(z[..., hidden:2 * hidden])
        g = jnp.tanh(z[..., 2 * hidden:3 * hidden])
        o = jax.nn.sigmoid(z[..., 3 * hidden:])
        c = f * c + i * g
        h = o * jnp.tanh(c)
        return (h, c), h

    (h, c), hs = jax.lax.scan(step, (h0, c0), xw, unroll=unroll)
    return hs, (h, c)


class LSTMLayer(nnx.Module):
    """One LSTM layer: ``[B, T, F] -> [B, T, H]`` (or time-major with ``time_major=True``)."""

    def __init__(self, in_features: int, hidden_size: int, *, forget_bias: float = 1.0, unroll: int = 1,
                 rngs: nnx.Rngs):
        self.in_features = in_features
        self.hidden_size = hidden_size
        self.unroll = unroll
        h = hidden_size
        self.kernel = nnx.Param(jax.nn.initializers.lecun_normal()(rngs.params(), (in_features, 4 * h)))
        self.recurrent_kernel = nnx.Param(_orthogonal_per_gate(rngs.params(), h))
        self.bias = nnx.Param(jnp.zeros((4 * h,), jnp.float32).at[h:2 * h].set(forget_bias))

    def __call__(self, x: jax.Array, *, time_major: bool = False, initial_state=None) -> jax.Array:
        if not time_major:
            x = jnp.swapaxes(x, 0, 1)
        xw = x @ self.kernel[...] + self.bias[...]
        batch = x.shape[1]
        if initial_state is None:
            zeros = jnp.zeros((batch, self.hidden_size), xw.dtype)
            initial_state = (zeros, zeros)
        hs, _ = lstm_scan(xw, self.recurrent_kernel[...], *initial_state, unroll=self.unroll)
        return hs if time_major else jnp.swapaxes(hs, 0, 1)


class StackedLSTM(nnx.Module):
    """``num_layers`` LSTM layers: ``[B, T, F] -> [B, T, H]``; transposes to time-major once."""

    def __init__(self, in_features: int, hidden_size: int, num_layers: int = 1, *, forget_bias: float = 1.0,
                 unroll: int = 1, rngs: nnx.Rngs):
        sizes = [in_features] + [hidden_size] * num_layers
        self.layers = nnx.List([
            LSTMLayer(sizes[i], hidden_size, forget_bias=forget_bias, unroll=unroll, rngs=rngs)
            for i in range(num_layers)
        ])

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jnp.swapaxes(x, 0, 1)
        for layer in self.layers:
            h = layer(h, time_major=True)
        return jnp.swapaxes(h, 0, 1)
