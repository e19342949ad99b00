"""Next-word LSTM for federated Stack Overflow (Reddi et al. 2021; FedJAX ``create_lstm_model``).

Embedding 96 -> LSTM-670 -> Dense 96 -> Dense(vocabulary). The vocabulary is
``vocab_size`` words plus PAD (0), BOS (1), EOS (2) and ``num_oov_buckets`` OOV
ids after the words: 10,004 outputs and 4,050,748 parameters with the
defaults, as FedJAX and TFF. The logits of PAD and BOS, which are never
targets, are masked to ``-1e9``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fedtrain import metrics as metrics_lib
from fedtrain.models.adapter import Model, from_nnx
from fedtrain.models.lstm import StackedLSTM

PAD, BOS, EOS = 0, 1, 2
VOCAB_SIZE = 10_000
NUM_OOV_BUCKETS = 1
SEQUENCE_LENGTH = 20
MASKED_LOGIT = -1e9
NON_PREDICTABLE_IDS = (PAD, BOS)


def full_vocab_size(vocab_size: int = VOCAB_SIZE, num_oov_buckets: int = NUM_OOV_BUCKETS) -> int:
    """Number of output ids: words, PAD, BOS, EOS and the OOV buckets."""
    return vocab_size + 3 + num_oov_buckets


def oov_ids(vocab_size: int = VOCAB_SIZE, num_oov_buckets: int = NUM_OOV_BUCKETS) -> tuple[int, ...]:
    """Ids of the OOV buckets (after the words, which occupy ``3 .. vocab_size + 2``)."""
    return tuple(range(vocab_size + 3, vocab_size + 3 + num_oov_buckets))


class StackOverflowLSTM(nnx.Module):
    """Word model: int ids ``[B, T]`` -> logits ``[B, T, vocab_size + 3 + num_oov_buckets]``.

    ``output_tanh=True`` applies ``tanh`` between the LSTM and the 96-unit
    projection, as FedJAX's model does (TFF's has no activation there).
    """

    def __init__(self, vocab_size: int = VOCAB_SIZE, embed_size: int = 96, hidden_size: int = 670,
                 num_layers: int = 1, *, num_oov_buckets: int = NUM_OOV_BUCKETS, output_tanh: bool = False,
                 unroll: int = 1, rngs: nnx.Rngs):
        self.num_outputs = full_vocab_size(vocab_size, num_oov_buckets)
        self.oov_ids = oov_ids(vocab_size, num_oov_buckets)
        self.output_tanh = output_tanh
        self.embed = nnx.Embed(self.num_outputs, embed_size, rngs=rngs)
        self.lstm = StackedLSTM(embed_size, hidden_size, num_layers, unroll=unroll, rngs=rngs)
        self.projection = nnx.Linear(hidden_size, embed_size, rngs=rngs)
        self.dense = nnx.Linear(embed_size, self.num_outputs, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.lstm(self.embed(x))
        if self.output_tanh:
            h = jnp.tanh(h)
        logits = self.dense(self.projection(h))
        masked = jnp.zeros((self.num_outputs,), bool).at[jnp.array(NON_PREDICTABLE_IDS)].set(True)
        return jnp.where(masked, jnp.asarray(MASKED_LOGIT, logits.dtype), logits)

    def default_loss(self) -> metrics_lib.Metric:
        """Per-token cross-entropy over non-PAD targets (what the trainer uses when no loss is given)."""
        return metrics_lib.sequence_crossentropy(pad_id=PAD)

    def default_metrics(self) -> list[metrics_lib.Metric]:
        """FedJAX's ``accuracy_in_vocab`` and ``accuracy_no_eos`` (see :func:`stackoverflow_model`)."""
        return [metrics_lib.sequence_accuracy(pad_id=PAD, eos_id=EOS, masked_logits=(PAD, BOS, EOS, *self.oov_ids),
                                              name="accuracy_in_vocab"),
                metrics_lib.sequence_accuracy(pad_id=PAD, eos_id=EOS)]


def stackoverflow_model(*, seed: int = 0, rngs: nnx.Rngs | None = None, **kwargs) -> Model:
    """:class:`StackOverflowLSTM` as a fedtrain ``Model`` with per-token loss and accuracies.

    Metrics (FedJAX's definitions): ``accuracy_in_vocab`` (PAD and EOS targets
    excluded; PAD, BOS, EOS and OOV never predicted, so OOV targets count as
    wrong) and ``accuracy_no_eos`` (PAD and EOS targets excluded). ``kwargs`` go
    to :class:`StackOverflowLSTM`.
    """
    module = StackOverflowLSTM(**kwargs, rngs=rngs if rngs is not None else nnx.Rngs(seed))
    return from_nnx(module, input_key="x")  # the module's default_loss() and default_metrics()
