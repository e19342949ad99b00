"""TensorBoard logging with tensorboardX.

Scalars go to two runs, ``<log_dir>/train`` and ``<log_dir>/validation`` (``val_loss``
is written as ``loss`` in the validation run), at step ``round``: 0-indexed, the same number as
the CSV's ``round``, ``History.rounds`` and the ``round`` of callbacks (Keras writes epoch ``e`` at
step ``e`` too). ``fedtrain.logs.events`` reads the event files back.
Per-client validation (``fit(validation_per_client=True)``) adds histograms over clients of each
validation metric, ``clients/<metric>`` in the validation run, from ``trainer.client_metrics``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from fedtrain.callbacks.base import Callback, overrides

_NOT_SCALARS = ("round_time",)
_NOT_CLIENT_METRICS = ("personalized", "model")
_PER_CLIENT_KEYS = ("val_num_clients", "val_personalized_clients")  # a round validated client by client


class TensorBoard(Callback):
    """Writes per-round scalars, client histograms, hyperparameters and (optionally) parameters.

    - scalars: every numeric log, ``train/`` and ``validation/`` runs;
    - ``client_histograms``: per-round histograms of the cohort's losses, update norms and sizes
      (``clients/loss``...; fetching per-client results is then enabled);
    - ``validation_histograms``: after a per-client validation, histograms over the validation clients
      of every metric in ``trainer.client_metrics`` (``clients/accuracy``... in the validation run), or
      only of the metric names given;
    - ``histogram_freq``: parameter histograms after every that many completed rounds (0: never),
      i.e. at steps ``histogram_freq - 1``, ``2 * histogram_freq - 1``, ...;
    - hyperparameters of the algorithm and of ``fit`` as a TensorBoard HParams record.
    """

    def __init__(self, log_dir: str | os.PathLike = "logs", histogram_freq: int = 0, client_histograms: bool = True,
                 write_hparams: bool = True, flush_secs: int = 30,
                 validation_histograms: bool | Sequence[str] = True) -> None:
        super().__init__()
        if int(histogram_freq) < 0:
            raise ValueError(f"histogram_freq must be >= 0, got {histogram_freq}.")
        if isinstance(validation_histograms, str):
            validation_histograms = (validation_histograms,)
        if not isinstance(validation_histograms, bool):
            validation_histograms = tuple(validation_histograms)
            if not all(isinstance(m, str) for m in validation_histograms):
                raise TypeError(f"validation_histograms must be True, False or metric names, "
                                f"got {validation_histograms!r}.")
        self.validation_histograms = validation_histograms
        self.log_dir = Path(os.path.abspath(os.fspath(log_dir)))
        self.histogram_freq = int(histogram_freq)
        self.client_histograms = bool(client_histograms)
        self.write_hparams = bool(write_hparams)
        self.flush_secs = int(flush_secs)
        self._writers: dict[str, object] = {}

    def wants(self, hook: str) -> bool:
        if hook == "on_client_results":
            return self.client_histograms
        return overrides(self, hook)

    def _writer(self, run: str):
        w = self._writers.get(run)
        if w is None:
            from tensorboardX import SummaryWriter

            w = SummaryWriter(str(self.log_dir / run), flush_secs=self.flush_secs)
            self._writers[run] = w
        return w

    def on_train_begin(self, logs=None) -> None:
        if self.write_hparams:
            self._write_hparams()

    def _write_hparams(self) -> None:
        from tensorboardX.summary import hparams

        hp = {}
        algo = getattr(self.trainer, "algorithm", None)
        for k, v in (getattr(algo, "hyperparams", None) or {}).items():
            hp[k] = v
        for k, v in (self.params or {}).items():
            hp.setdefault(k, v)
        hp = {k: (v if isinstance(v, (bool, str)) else float(v)) for k, v in hp.items()
              if isinstance(v, (int, float, str, bool)) and v is not None}
        exp, ssi, sei = hparams(hp, {"loss": 0.0})
        fw = self._writer("train").file_writer
        for s in (exp, ssi, sei):
            fw.add_summary(s)

    def on_round_end(self, round: int, logs=None) -> None:
        step = round  # 0-indexed, as the CSV's round column and History.rounds
        for key, value in (logs or {}).items():
            if key in _NOT_SCALARS or not isinstance(value, (int, float)):
                continue
            if key.startswith("val_"):
                self._writer("validation").add_scalar(key[4:], float(value), step)
            else:
                self._writer("train").add_scalar(key, float(value), step)
        if self.validation_histograms and any(k in (logs or {}) for k in _PER_CLIENT_KEYS):
            self._write_client_metrics(step)
        if self.histogram_freq and (round + 1) % self.histogram_freq == 0:
            w = self._writer("train")
            for path, leaf in jax.tree_util.tree_flatten_with_path(self.trainer.params)[0]:
                name = "params/" + "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
                w.add_histogram(name, np.asarray(leaf, np.float64).reshape(-1), step)

    def _write_client_metrics(self, step: int) -> None:
        rows = list((getattr(self.trainer, "client_metrics", None) or {}).values())
        if not rows:
            return
        found = sorted({k for r in rows for k in r if k not in _NOT_CLIENT_METRICS})
        names = found if self.validation_histograms is True else list(self.validation_histograms)
        unknown = [m for m in names if m not in found]
        if unknown:
            raise ValueError(f"TensorBoard(validation_histograms=...): no per-client metric {unknown}; the "
                             f"validation gives {found}.")
        w = self._writer("validation")
        for name in names:
            values = np.asarray([r.get(name, np.nan) for r in rows], np.float64)
            values = values[np.isfinite(values)]
            if values.size:
                w.add_histogram(f"clients/{name}", values, step)

    def on_client_results(self, round: int, client_ids, client_logs) -> None:
        if not self.client_histograms or not client_logs:
            return
        w = self._writer("train")
        for key in ("loss", "update_norm", "num_examples"):
            values = np.asarray([c.get(key, np.nan) for c in client_logs], np.float64)
            values = values[np.isfinite(values)]
            if values.size:
                w.add_histogram(f"clients/{key}", values, round)

    def on_train_end(self, logs=None) -> None:
        for w in self._writers.values():
            w.close()
        self._writers = {}
