"""Next-character LSTM for federated Shakespeare (McMahan et al. 2017; Reddi et al. 2021).

Embedding 8 -> 2 x LSTM-256 -> Dense(vocabulary); 820,522 parameters with the
defaults. The logit of PAD, which is never a (weighted) target, is masked to
``-1e9``. BOS stays predictable: clients' speeches are joined as
``BOS ... EOS BOS ...``, so BOS is the target after every EOS.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fedtrain import metrics as metrics_lib
from fedtrain.models.adapter import Model, from_nnx
from fedtrain.models.lstm import StackedLSTM

from fedtrain.datasets.shakespeare import BOS, EOS, OOV, PAD, VOCAB_SIZE  # noqa: F401  (re-exported)

MASKED_LOGIT = -1e9
NON_PREDICTABLE_IDS = (PAD,)


class ShakespeareLSTM(nnx.Module):
    """Character model: int ids ``[B, T]`` -> logits ``[B, T, vocab_size]``."""

    def __init__(self, embed_size: int = 8, hidden_size: int = 256, num_layers: int = 2,
                 vocab_size: int = VOCAB_SIZE, *, unroll: int = 1, rngs: nnx.Rngs):
        self.vocab_size = vocab_size
        self.embed = nnx.Embed(vocab_size, embed_size, rngs=rngs)
        self.lstm = StackedLSTM(embed_size, hidden_size, num_layers, unroll=unroll, rngs=rngs)
        self.dense = nnx.Linear(hidden_size, vocab_size, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.lstm(self.embed(x))
        logits = self.dense(h)
        masked = jnp.zeros((self.vocab_size,), bool).at[jnp.array(NON_PREDICTABLE_IDS)].set(True)
        return jnp.where(masked, jnp.asarray(MASKED_LOGIT, logits.dtype), logits)

    def default_loss(self) -> metrics_lib.Metric:
        """Per-token cross-entropy over non-PAD targets (what the trainer uses when no loss is given)."""
        return metrics_lib.sequence_crossentropy(pad_id=PAD)

    def default_metrics(self) -> list[metrics_lib.Metric]:
        """``accuracy`` (PAD excluded) and ``accuracy_no_eos`` (PAD and EOS excluded)."""
        return [metrics_lib.sequence_accuracy(pad_id=PAD), metrics_lib.sequence_accuracy(pad_id=PAD, eos_id=EOS)]


def shakespeare_model(*, seed: int = 0, rngs: nnx.Rngs | None = None, **kwargs) -> Model:
    """:class:`ShakespeareLSTM` as a fedtrain ``Model`` with per-token loss and accuracies.

    Metrics: ``accuracy`` (PAD excluded) and ``accuracy_no_eos`` (PAD and EOS
    excluded). ``kwargs`` go to :class:`ShakespeareLSTM`.
    """
    module = ShakespeareLSTM(**kwargs, rngs=rngs if rngs is not None else nnx.Rngs(seed))
    return from_nnx(module, input_key="x")  # the module's default_loss() and default_metrics()
