"""Fine-tune, then evaluate: the personalization baseline "FedAvg + fine-tuning" for any global model.

Every evaluated client starts from the same global parameters, trains on its own training examples
with ``client_optimizer`` (``local_epochs`` passes, capped at ``local_steps``, like a round's local
training), and is evaluated on its own test examples before and after. Clients run ``lanes`` at a
time in one compiled program per block shape (``vmap`` over the lanes; each lane loops over its own
step count); the block's step and evaluation-batch capacities are rounded up to powers of two, so
the number of compiles grows with the logarithm of the largest client, not with the population.

The examples a client visits are those of :func:`fine_tune_order`, a function of ``seed`` and the
client's position in the training data only: the same client gets the same fine-tuning whichever
other clients are evaluated with it, in whatever order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedtrain.data.federated_data import FederatedData
from fedtrain.evaluation import (DEFAULT_BATCH_SIZE, DEFAULT_LANES, Totals, _client_arrays, higher_is_better, lane_sums,
                                 summarize_clients)
from fedtrain.engine.plan import BatchSpec, check_client, example_order, feature_specs
from fedtrain.models.adapter import MASK_KEY, Model, grad_and_metrics

_ORDER_TAG = 0xF1


class FineTuneResult(NamedTuple):
    """Per-client totals ``{client_id: {metric: (sum, count)}}`` on the test data ``before`` and
    ``after`` fine-tuning, their distributions over clients (:func:`fedtrain.evaluation.summarize_clients`:
    ``summary_before``, ``summary_after``), ``improvement`` (for each metric ``m``: ``m_client_mean``,
    the mean over clients of after minus before, and ``m_improved``, the fraction of clients whose value
    got better, lower for losses and errors), the fine-tuning steps of each client (``steps``), the
    clients left out (``skipped``: no training examples, with ``missing="skip"``) and the number of
    block shapes this call compiled (``compiles``; a repeated call with the same model and optimizer
    compiles none)."""

    before: Totals
    after: Totals
    summary_before: dict[str, float]
    summary_after: dict[str, float]
    improvement: dict[str, float]
    steps: dict[str, int]
    skipped: list[str]
    compiles: int

    @property
    def logs(self) -> dict[str, float]:
        """One flat dict: ``ft_before_*``, ``ft_after_*`` (the summaries) and ``ft_gain_*`` (improvement)."""
        return {**{f"ft_before_{k}": v for k, v in self.summary_before.items()},
                **{f"ft_after_{k}": v for k, v in self.summary_after.items()},
                **{f"ft_gain_{k}": v for k, v in self.improvement.items()}}


def fine_tune_order(num_examples: int, spec: BatchSpec, seed: int, index: int) -> np.ndarray:
    """Indices of the training examples client ``index`` (its position in the training data's
    ``client_ids``) visits when fine-tuned under ``spec``: ``spec.steps(n) * batch_size`` entries, one
    shuffled pass per epoch, ``-1`` padding the last batch."""
    steps = int(spec.steps(int(num_examples)))
    if steps == 0:
        return np.zeros((0,), np.int64)
    rng = np.random.default_rng([int(seed), int(index), _ORDER_TAG])
    return example_order(int(num_examples), spec, steps, rng)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


_BLOCK_FNS: dict[tuple, tuple] = {}  # (id(model), id(optimizer), names) -> (model, optimizer, jitted program)


def _cached_block_fn(model: Model, tx: optax.GradientTransformation, names: tuple[str, ...]):
    """One jitted block program per model and optimizer object: a repeated call compiles nothing. The
    entry holds both objects, so their ids cannot be reused while it exists; the 8 newest are kept."""
    key = (id(model), id(tx), names)
    entry = _BLOCK_FNS.get(key)
    if entry is None or entry[0] is not model or entry[1] is not tx:
        while len(_BLOCK_FNS) >= 8:
            _BLOCK_FNS.pop(next(iter(_BLOCK_FNS)))
        entry = _BLOCK_FNS[key] = (model, tx, _block_fn(model, tx, names))
    return entry[2]


def _block_fn(model: Model, tx: optax.GradientTransformation, names: tuple[str, ...]):
    """The jitted program of one block: ``(params, train [L, T, B, ...], steps [L], test [L, E, Be, ...],
    keys [L]) -> (before [L, M, 2], after [L, M, 2])``."""

    def sums(params, test):
        def body(acc, batch):
            out = lane_sums(model, params, batch)
            return acc + jnp.stack([jnp.stack(out[n]) for n in names]), None

        zero = jnp.zeros((len(names), 2), jnp.float32)
        return jax.lax.scan(body, zero, test)[0]

    def one(params, train, steps, test, key):
        def step(t, carry):
            p, opt_state = carry
            batch = jax.tree.map(lambda v: jax.lax.dynamic_index_in_dim(v, t, keepdims=False), train)
            grads, _ = grad_and_metrics(model, p, batch, jax.random.fold_in(key, t))
            updates, opt_state = tx.update(grads, opt_state, p)
            return optax.apply_updates(p, updates), opt_state

        tuned, _ = jax.lax.fori_loop(0, steps, step, (params, tx.init(params)))  # each lane its own count
        return sums(params, test), sums(tuned, test)

    return jax.jit(jax.vmap(one, in_axes=(None, 0, 0, 0, 0)))


def _check_choice(missing: str) -> None:
    if missing not in ("error", "skip"):
        raise ValueError(f"missing must be 'error' or 'skip', got {missing!r}.")


def fine_tune_evaluate(model: Model, params: Any, train_data: FederatedData, test_data: FederatedData, *,
                       client_optimizer: optax.GradientTransformation, batch_size: int,
                       local_epochs: int | None = 1, local_steps: int | None = None,
                       eval_batch_size: int | None = None, seed: int = 0,
                       client_ids: Sequence[str] | None = None,
                       missing: Literal["error", "skip"] = "error", lanes: int = DEFAULT_LANES) -> FineTuneResult:
    """Fine-tunes ``params`` on each client's examples in ``train_data`` and evaluates it on the same
    client's examples in ``test_data``, before and after (see the module docstring).

    ``client_ids``: the clients to evaluate (default: every client of ``test_data`` with examples).
    A client without training examples is an error naming it (``missing="error"``), or is left out and
    listed in ``result.skipped`` (``missing="skip"``)."""
    _check_choice(missing)
    if not isinstance(client_optimizer, optax.GradientTransformation):
        raise TypeError(f"client_optimizer must be an optax.GradientTransformation (e.g. optax.sgd(0.01)), "
                        f"got {type(client_optimizer).__name__}.")
    spec = BatchSpec(int(batch_size), local_epochs, local_steps).validate()
    lanes = int(lanes)
    if lanes < 1:
        raise ValueError(f"lanes must be >= 1, got {lanes}.")
    eval_bs = int(eval_batch_size or DEFAULT_BATCH_SIZE)
    if eval_bs < 1:
        raise ValueError(f"eval_batch_size must be >= 1, got {eval_batch_size}.")
    test_ids = list(test_data.client_ids)
    if client_ids is None:
        ids = [c for c in test_ids if test_data.client_size(c) > 0]
    else:
        ids = list(dict.fromkeys(client_ids))
        unknown = [c for c in ids if c not in set(test_ids)]
        if unknown:
            raise ValueError(f"{len(unknown)} of client_ids are not clients of the test data "
                             f"(first: {unknown[:3]}); pick them from test_data.client_ids.")
        ids = [c for c in ids if test_data.client_size(c) > 0]
    if not ids:
        raise ValueError("no client to evaluate: the test data has no client with examples"
                         + (" among client_ids." if client_ids is not None else "."))
    train_index = {c: i for i, c in enumerate(train_data.client_ids)}
    train_sizes = {c: train_data.client_size(c) if c in train_index else 0 for c in ids}
    lacking = [c for c in ids if train_sizes[c] == 0]
    if lacking and missing == "error":
        raise ValueError(
            f"{len(lacking)} of {len(ids)} test clients have no training examples to fine-tune on "
            f"(first: {lacking[:3]}); pass missing='skip' to leave them out, or evaluate them with "
            "trainer.evaluate(per_client=True).")
    ids = [c for c in ids if train_sizes[c] > 0]
    steps = {c: int(spec.steps(train_sizes[c])) for c in ids}
    if not ids:
        return FineTuneResult({}, {}, {}, {}, {}, {}, lacking, 0)

    train_specs = feature_specs(train_data.get_client(ids[0]))
    test_specs = feature_specs(test_data.get_client(ids[0]))
    names = (model.loss.name, *(m.name for m in model.metrics))
    fn = _cached_block_fn(model, client_optimizer, names)
    compiled_before = fn._cache_size()
    root = jax.random.key(int(seed))
    before = np.zeros((len(ids), len(names), 2), np.float64)
    after = np.zeros_like(before)
    order = sorted(range(len(ids)), key=lambda i: (-steps[ids[i]], i))  # similar step counts share a block
    pending = []

    def drain():
        for group, out in pending:
            b, a = jax.device_get(out)
            before[group] = np.asarray(b, np.float64)[:len(group)]
            after[group] = np.asarray(a, np.float64)[:len(group)]
        pending.clear()

    B = spec.batch_size
    for g in range(0, len(order), lanes):
        group = order[g:g + lanes]
        cids = [ids[i] for i in group]
        T = _pow2(max(steps[c] for c in cids))
        E = _pow2(max(-(-test_data.client_size(c) // eval_bs) for c in cids))
        train = {k: np.zeros((lanes, T, B) + s.shape, s.dtype) for k, s in train_specs.items()}
        train[MASK_KEY] = np.zeros((lanes, T, B), np.float32)
        test = {k: np.zeros((lanes, E, eval_bs) + s.shape, s.dtype) for k, s in test_specs.items()}
        test[MASK_KEY] = np.zeros((lanes, E, eval_bs), np.float32)
        lane_steps = np.zeros((lanes,), np.int32)
        keys = []
        for lane, cid in enumerate(cids):
            examples = train_data.get_client(cid)
            check_client(cid, examples, train_specs, train_sizes[cid], what="the fine-tuning data")
            visit = fine_tune_order(train_sizes[cid], spec, seed, train_index[cid])
            k = steps[cid]
            take = np.maximum(visit, 0)
            for name, s in train_specs.items():
                train[name][lane, :k] = examples[name][take].reshape((k, B) + s.shape)
            train[MASK_KEY][lane, :k] = (visit >= 0).reshape(k, B)
            lane_steps[lane] = k
            held_out = test_data.get_client(cid)
            check_client(cid, held_out, test_specs, test_data.client_size(cid), what="the test data")
            arrays = _client_arrays(held_out, test_specs, eval_bs, E)
            for name in test:
                test[name][lane] = arrays[name]
            keys.append(jax.random.fold_in(root, train_index[cid]))
        keys += [root] * (lanes - len(cids))
        pending.append((group, fn(params, train, lane_steps, test, jnp.stack(keys))))
        if len(pending) >= 4:  # the device runs ahead of the host while memory stays bounded
            drain()
    drain()

    def totals(acc):
        return {c: {n: (float(r[0]), float(r[1])) for n, r in zip(names, rows)} for c, rows in zip(ids, acc)}

    before_t, after_t = totals(before), totals(after)
    improvement: dict[str, float] = {}
    for j, n in enumerate(names):
        has = before[:, j, 1] > 0
        if not has.any():
            continue
        b = before[has, j, 0] / before[has, j, 1]
        a = after[has, j, 0] / after[has, j, 1]
        better = a > b if higher_is_better(n) else a < b
        improvement.update({f"{n}_client_mean": float(np.mean(a - b)), f"{n}_improved": float(np.mean(better))})
    return FineTuneResult(before_t, after_t, summarize_clients(before_t), summarize_clients(after_t), improvement,
                          steps, lacking, int(fn._cache_size() - compiled_before))

