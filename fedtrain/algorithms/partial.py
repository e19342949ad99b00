"""Partially local models: FedPer, FedRep and FedBN.

A :class:`Partition` splits the parameters into a *global* part, trained federatedly, and a *local*
part that each client keeps in its client state and never sends. The parts are nested dicts of
arrays keyed by the parameter paths (``{"head": {"kernel": ...}}``), valid pytrees on their own;
:meth:`Partition.merge` puts them back into the model's parameter structure.

In all three algorithms the server broadcasts the global part only; a client trains from it merged
with its stored local part (the initial local part on its first round), sends the delta of the global
part to the aggregator and stores its new local part. ``server_tx`` updates the global part only. The
server state keeps the full parameters; their local part stays the initial one, the model of clients
that never trained. ``personal_params`` is the server's global part merged with a client's local part.

- FedPer (Arivazhagan et al., 2019): every local step trains all parameters jointly.
- FedRep (Collins et al., 2021): the first ``head_steps`` local steps of each participation train
  the local part (head) with the body frozen, the remaining steps the global part (body) with the head
  frozen.
- FedBN (Li et al., 2021): FedPer whose local part is the normalization layers' parameters.

The model adapter (``fedtrain.models.from_nnx``) trains ``nnx.Param`` only and keeps every other
variable fixed, BatchNorm running statistics (``nnx.BatchStat``) included: they are neither updated
nor personalised. FedBN personalises the normalization scale and bias; BatchNorm normalises with the
batch's statistics in training and with the initial running statistics (mean 0, variance 1) in
evaluation, while LayerNorm and GroupNorm behave alike in both.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedtrain.aggregators import Aggregator, weighted_mean
from fedtrain.algorithms._common import tree_sub
from fedtrain.algorithms.base import Algorithm, ClientOut

PyTree = Any
Path = tuple[str, ...]
LocalFilter = Callable[[Path], bool] | str | Sequence[str | Sequence[str]]

NORM_PATTERN = r"norm|(^|_)(bn|ln|gn)\d*($|_)"


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def param_paths(params: PyTree) -> list[Path]:
    """Each leaf's path as a tuple of strings (``("head", "kernel")``), in leaf order; the ``value``
    attribute of an ``nnx`` variable is left out."""
    paths = []
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
            path = path[:-1]
        paths.append(tuple(_key_name(k) for k in path))
    return paths


def _top_level(paths: Sequence[Path]) -> str:
    return ", ".join(repr(n) for n in sorted({p[0] for p in paths if p}))


def _as_prefix(prefix) -> Path:
    if isinstance(prefix, str):
        return tuple(p for p in prefix.split("/") if p)
    return tuple(str(p) for p in prefix)


def _check_filter(local: LocalFilter) -> None:
    if callable(local):
        return
    if isinstance(local, str):
        try:
            re.compile(local)
        except re.error as e:
            raise ValueError(f"the local-part pattern {local!r} is not a valid regular expression: {e}.") from e
        return
    if isinstance(local, Sequence) and local and all(isinstance(p, (str, Sequence)) for p in local):
        if any(not _as_prefix(p) for p in local):
            raise ValueError(f"the local-part path prefixes must not be empty; got {list(local)!r}.")
        return
    raise TypeError(f"the local part is selected by a function of the parameter path (e.g. lambda path: path[0] == "
                    f"'head'), a regular expression on the '/'-joined path, or a non-empty list of path prefixes "
                    f"(e.g. ['head']); got {local!r}.")


class Partition(NamedTuple):
    """Which leaves of a parameter tree are local. ``treedef`` and ``paths`` describe the full tree,
    ``local`` flags each leaf."""

    treedef: Any
    paths: tuple[Path, ...]
    local: tuple[bool, ...]

    def split(self, params: PyTree) -> tuple[dict, dict]:
        """``(global_part, local_part)``: nested dicts of ``params``' leaves keyed by their paths."""
        leaves = self.treedef.flatten_up_to(params)
        parts: tuple[dict, dict] = ({}, {})
        for path, is_local, leaf in zip(self.paths, self.local, leaves):
            node = parts[is_local]
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = leaf
        return parts

    def merge(self, global_part: dict, local_part: dict) -> PyTree:
        """The full parameter tree from its two parts (the inverse of :meth:`split`)."""
        leaves = []
        for path, is_local in zip(self.paths, self.local):
            node = local_part if is_local else global_part
            for key in path:
                node = node[key]
            leaves.append(node)
        return self.treedef.unflatten(leaves)


def partition(params: PyTree, local: LocalFilter) -> Partition:
    """The partition of ``params`` whose local part is selected by ``local``: a function of the path
    (a tuple of strings, e.g. ``lambda path: path[0] == "head"``), a regular expression searched in
    the ``'/'``-joined path (``"^head/"``), or a list of path prefixes (``["head"]``,
    ``["blocks/3", ("head", "kernel")]``), each of which must exist. Raises ``ValueError`` when the
    local part would be empty or everything."""
    _check_filter(local)
    paths = param_paths(params)
    if not paths or any(not p for p in paths):
        raise ValueError("a partially local model needs a tree of named parameters (e.g. an nnx.State or a dict).")
    if len(set(paths)) != len(paths):
        raise ValueError("two parameters have the same path once their keys are written as strings.")
    if callable(local):
        flags = tuple(bool(local(p)) for p in paths)
    elif isinstance(local, str):
        pattern = re.compile(local)
        flags = tuple(pattern.search("/".join(p)) is not None for p in paths)
    else:
        prefixes = [_as_prefix(p) for p in local]
        for prefix in prefixes:
            if not any(p[:len(prefix)] == prefix for p in paths):
                raise ValueError(f"the local-part prefix {'/'.join(prefix)!r} names no parameter of the model; its "
                                 f"top-level paths are {_top_level(paths)}.")
        flags = tuple(any(p[:len(q)] == q for q in prefixes) for p in paths)
    if not any(flags):
        raise ValueError(f"the local part selects no parameter (local={local!r}); the model's top-level paths are "
                         f"{_top_level(paths)}.")
    if all(flags):
        raise ValueError(f"the local part selects every parameter (local={local!r}), leaving nothing to train "
                         f"federatedly; the model's top-level paths are {_top_level(paths)}.")
    return Partition(jax.tree.structure(params), tuple(paths), flags)


def is_norm_path(path: Path) -> bool:
    """Whether a path names a normalization layer's parameter: a key containing ``norm`` (``layernorm``,
    ``batch_norm``, ``norm1``) or a ``bn``/``ln``/``gn`` key (``bn``, ``bn2``, ``conv_bn``), any case."""
    return any(re.search(NORM_PATTERN, k.lower()) for k in path[:-1] or path)


class PartialState(NamedTuple):
    params: Any  # the full parameters; the local part stays the initial one
    opt_state: Any  # server_tx's state over the global part


class PartialLocal(NamedTuple):
    params: Any  # the full parameters while the client trains
    opt_state: Any  # client_tx's state (FedPer, FedBN: all parameters; FedRep: the global part)
    head_opt_state: Any = ()  # FedRep: head_tx's state over the local part


def _on_global(aggregator: Aggregator, local: LocalFilter) -> Aggregator:
    """``aggregator`` whose stateful stages are initialised on the global part of the parameters."""
    stages = tuple(s._replace(init=lambda params, s=s: s.init(partition(params, local).split(params)[0]))
                   if Aggregator((s,)).stateful else s for s in aggregator.stages)
    return aggregator._replace(stages=stages)


def _partial(name: str, local: LocalFilter, client_tx: optax.GradientTransformation,
             server_tx: optax.GradientTransformation | None, aggregator: Aggregator | None,
             head_tx: optax.GradientTransformation | None = None, head_steps: int | None = None,
             hyperparams: dict | None = None) -> Algorithm:
    _check_filter(local)
    server_tx = server_tx or optax.sgd(1.0)

    def parts(ctx):
        return partition(ctx.model.init_params, local)

    def init(params):
        global_part, _ = partition(params, local).split(params)
        return PartialState(params, server_tx.init(global_part))

    def client_state_init(params):
        return partition(params, local).split(params)[1]

    def broadcast(state, ctx):
        return partition(state.params, local).split(state.params)[0]

    def personal_params(state, client_state):
        p = partition(state.params, local)
        return p.merge(p.split(state.params)[0], client_state)

    def client_init(global_part, client_state, prepass, ctx):
        p = parts(ctx)
        params = p.merge(global_part, client_state)
        if head_steps is None:
            return PartialLocal(params, ctx.init_optimizer(client_tx, params))
        return PartialLocal(params, ctx.init_optimizer(client_tx, global_part),
                            ctx.init_optimizer(head_tx, client_state))

    def client_step(local_, batch, ctx):
        grads, sums = ctx.grad(local_.params, batch)
        if head_steps is None:
            updates, opt_state = client_tx.update(grads, local_.opt_state, local_.params)
            return local_._replace(params=optax.apply_updates(local_.params, updates), opt_state=opt_state), sums
        p = parts(ctx)
        (body, head), (body_grads, head_grads) = p.split(local_.params), p.split(grads)

        def train_head(_):
            updates, state = head_tx.update(head_grads, local_.head_opt_state, head)
            return p.merge(body, optax.apply_updates(head, updates)), local_.opt_state, state

        def train_body(_):
            updates, state = client_tx.update(body_grads, local_.opt_state, body)
            return p.merge(optax.apply_updates(body, updates), head), state, local_.head_opt_state

        params, opt_state, head_opt_state = jax.lax.cond(ctx.step < head_steps, train_head, train_body, None)
        return PartialLocal(params, opt_state, head_opt_state), sums

    def client_final(global_part, local_, ctx):
        body, head = parts(ctx).split(local_.params)
        weight = ctx.num_examples
        if head_steps is not None:  # a round of head steps only sends no body update
            weight = jnp.where(ctx.num_steps > head_steps, weight, jnp.zeros_like(weight))
        return ClientOut(tree_sub(global_part, body), weight, head)

    def server_update(state, mean_delta, stats, ctx):
        p = partition(state.params, local)
        global_part, local_part = p.split(state.params)
        updates, opt_state = server_tx.update(mean_delta, state.opt_state, global_part)
        return PartialState(p.merge(optax.apply_updates(global_part, updates), local_part), opt_state), {}

    return Algorithm(name, init, client_init, client_step, client_final, server_update, broadcast,
                     client_state_init=client_state_init,
                     aggregator=_on_global(aggregator or weighted_mean(), local),
                     personal_params=personal_params, hyperparams=dict(hyperparams or {}))


def fedper(client_tx: optax.GradientTransformation, local: LocalFilter,
           server_tx: optax.GradientTransformation | None = None, *,
           aggregator: Aggregator | None = None) -> Algorithm:
    """FedPer: all parameters trained jointly on every local step; the part selected by ``local``
    (see :func:`partition`) stays on the client; ``server_tx`` (default SGD at rate 1, plain averaging)
    steps the global part on the mean delta."""
    return _partial("fedper", local, client_tx, server_tx, aggregator)


def fedrep(client_tx: optax.GradientTransformation, local: LocalFilter, head_steps: int,
           server_tx: optax.GradientTransformation | None = None, *,
           head_tx: optax.GradientTransformation | None = None,
           aggregator: Aggregator | None = None) -> Algorithm:
    """FedRep: local steps ``0 .. head_steps - 1`` of each participation train the local part (the
    head, selected by ``local``) with ``head_tx`` (default ``client_tx``) and the body frozen; the
    remaining ``num_steps - head_steps`` steps train the body with ``client_tx`` and the head frozen.

    ``head_steps`` is a count of local steps, whatever the epochs: with ``local_epochs=E`` a client of
    ``n`` examples takes ``E * ceil(n / batch_size)`` steps, with ``local_steps=K`` it takes ``K``. A
    client whose round has ``num_steps <= head_steps`` trains its head only: it keeps the new head and
    sends a zero body update with weight 0, so it does not count in the mean."""
    if isinstance(head_steps, bool) or not isinstance(head_steps, int) or head_steps < 1:
        raise ValueError(f"fedrep needs head_steps to be an int >= 1 (local steps on the head before the body "
                         f"trains); got {head_steps!r}.")
    return _partial("fedrep", local, client_tx, server_tx, aggregator, head_tx or client_tx, head_steps,
                    {"head_steps": head_steps})


def fedbn(client_tx: optax.GradientTransformation, server_tx: optax.GradientTransformation | None = None, *,
          local: LocalFilter = is_norm_path, aggregator: Aggregator | None = None) -> Algorithm:
    """FedBN: FedPer whose local part is the normalization layers' parameters (scale and bias), found by
    name with :func:`is_norm_path` unless ``local`` says otherwise. Running statistics are not
    parameters of the adapter and stay fixed (see the module docstring)."""
    return _partial("fedbn", local, client_tx, server_tx, aggregator)
