"""Centralized evaluation: every example of every client, in fixed-size batches (one compile)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedtrain.data.federated_data import FederatedData
from fedtrain.engine.plan import feature_specs
from fedtrain.models.adapter import MASK_KEY, Model, metric_sums

DEFAULT_BATCH_SIZE = 128


class Evaluator:
    """Sums loss and metrics over a dataset with one jitted step of fixed batch size."""

    def __init__(self, model: Model):
        self.model = model
        self._step = jax.jit(self._sums)
        self._apply = jax.jit(lambda p, x: model.apply(p, x, None, False))

    def _sums(self, params, batch):
        logits = self.model.apply(params, batch[self.model.input_key], None, False)
        return metric_sums(self.model, batch, logits)

    def evaluate(self, params, data: FederatedData, *, batch_size: int | None = None) -> dict[str, float]:
        bs = int(batch_size or DEFAULT_BATCH_SIZE)
        totals = None
        buffer: dict[str, np.ndarray] | None = None
        fill = 0
        specs = None

        def flush(n_real: int):
            # The step runs asynchronously and may read the numpy memory in place, so the
            # buffer is handed over and a new one is started.
            nonlocal totals, buffer
            batch = dict(buffer)
            mask = np.zeros((bs,), np.float32)
            mask[:n_real] = 1.0
            batch[MASK_KEY] = mask
            sums = self._step(params, batch)
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
            buffer = {k: np.zeros_like(v) for k, v in buffer.items()}

        for cid in data.client_ids:
            examples = data.get_client(cid)
            if specs is None:
                specs = feature_specs(examples)
                buffer = {k: np.zeros((bs,) + s.shape, s.dtype) for k, s in specs.items()}
            n = next(iter(examples.values())).shape[0] if examples else 0
            start = 0
            while start < n:
                take = min(bs - fill, n - start)
                for k in buffer:
                    if k not in examples:
                        raise ValueError(f"client {cid!r} lacks feature {k!r} that other clients have.")
                    buffer[k][fill:fill + take] = examples[k][start:start + take]
                fill += take
                start += take
                if fill == bs:
                    flush(bs)
                    fill = 0
        if fill:
            flush(fill)
        if totals is None:
            raise ValueError("the evaluation data has no examples.")
        totals = jax.device_get(totals)
        return {name: float(s) / float(c) if float(c) > 0 else float("nan") for name, (s, c) in totals.items()}

    def predict(self, params, x: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
        x = np.asarray(x)
        n = x.shape[0]
        outs = []
        for start in range(0, n, batch_size):
            chunk = x[start:start + batch_size]
            real = chunk.shape[0]
            if real < batch_size:
                chunk = np.concatenate([chunk, np.zeros((batch_size - real,) + chunk.shape[1:], chunk.dtype)])
            outs.append(np.asarray(self._apply(params, chunk))[:real])
        return np.concatenate(outs) if outs else np.zeros((0,))
