"""Partially local models (FedPer, FedRep, FedBN): float64 NumPy references of the update rules, the
local part never reaching the server, checkpoints with client states, and the partition's errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import fedtrain
from fedtrain import aggregators as agg
from fedtrain.aggregators.base import Stage
from fedtrain.algorithms.partial import fedbn, fedper, fedrep, is_norm_path, param_paths, partition
from tests.conftest import straight_and_resumed
from tests.test_algorithms import Problem, pure

LR = 0.3


class TwoLayer(nnx.Module):
    """logits = tanh(x W1 + b1) W2 + b2: a body and a head."""

    def __init__(self, *, rngs):
        self.body = nnx.Linear(4, 5, rngs=rngs)
        self.head = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.body(x)))


class NormNet(nnx.Module):
    def __init__(self, norm="layer", *, rngs):
        self.body = nnx.Linear(4, 5, rngs=rngs)
        self.norm = nnx.LayerNorm(5, rngs=rngs) if norm == "layer" else nnx.BatchNorm(5, rngs=rngs)
        self.head = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.norm(self.body(x))))


def is_head(path):
    return path[0] == "head"


# ------------------------------------------------------------------------------------- NumPy model
def grads(p, x, y):
    """Mean softmax cross-entropy gradient of the two-layer model, float64."""
    h = np.tanh(x @ p["body"]["kernel"] + p["body"]["bias"])
    logits = h @ p["head"]["kernel"] + p["head"]["bias"]
    e = np.exp(logits - logits.max(-1, keepdims=True))
    d = e / e.sum(-1, keepdims=True)
    d[np.arange(len(y)), y] -= 1.0
    d /= len(y)
    dh = d @ p["head"]["kernel"].T * (1 - h ** 2)
    return {"body": {"kernel": x.T @ dh, "bias": dh.sum(0)}, "head": {"kernel": h.T @ d, "bias": d.sum(0)}}


def as64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), pure(tree))


class Adam:
    def __init__(self, lr, b1=0.9, b2=0.999, eps=1e-8):
        self.lr, self.b1, self.b2, self.eps, self.t, self.m, self.v = lr, b1, b2, eps, 0, None, None

    def step(self, w, g):
        if self.m is None:
            self.m, self.v = jax.tree.map(np.zeros_like, g), jax.tree.map(np.zeros_like, g)
        self.t += 1
        self.m = jax.tree.map(lambda m, g: self.b1 * m + (1 - self.b1) * g, self.m, g)
        self.v = jax.tree.map(lambda v, g: self.b2 * v + (1 - self.b2) * g * g, self.v, g)
        return jax.tree.map(lambda w, m, v: w - self.lr * (m / (1 - self.b1 ** self.t))
                            / (np.sqrt(v / (1 - self.b2 ** self.t)) + self.eps), w, self.m, self.v)


def train(pb, algorithm, seed=7, backend="scan", lanes=None):
    cohorts = []
    t = fedtrain.FederatedTrainer(TwoLayer(rngs=nnx.Rngs(4)), pb.data, algorithm, backend=backend, seed=seed,
                                  lanes=lanes)
    p0 = as64(t.params)
    t.fit(rounds=pb.rounds, clients_per_round=pb.k, batch_size=pb.spec.batch_size,
          local_epochs=pb.spec.local_epochs, local_steps=pb.spec.local_steps, verbose=0,
          callbacks=[fedtrain.callbacks.LambdaCallback(on_clients_sampled=lambda r, ids: cohorts.append(ids))])
    pb.trainer, pb.seed, pb.cohorts = t, seed, cohorts
    return p0


def reference(pb, p0, head_steps=None, server_lr=1.0, adam=None):
    """Server body and every trained client's head after the rounds pb.trainer ran, in float64."""
    body, head0 = p0["body"], p0["head"]
    heads = {}
    for r, cohort in enumerate(pb.cohorts):
        deltas, weights = [], []
        for cid in cohort:
            x, y = pb.xy(cid)
            p = {"body": body, "head": heads.get(cid, head0)}
            batches = pb.batches(cid, r)
            for j, idx in enumerate(batches):
                g = grads(p, x[idx], y[idx])
                train_part = ["body", "head"] if head_steps is None else ["head" if j < head_steps else "body"]
                p = {k: jax.tree.map(lambda w, g: w - LR * g, p[k], g[k]) if k in train_part else p[k] for k in p}
            heads[cid] = p["head"]
            deltas.append(jax.tree.map(np.subtract, body, p["body"]))
            weights.append(len(y) if head_steps is None or len(batches) > head_steps else 0.0)
        w = np.array(weights, float)
        mean = jax.tree.map(lambda *d: np.tensordot(w, np.stack(d), 1) / max(w.sum(), np.finfo(np.float32).tiny),
                            *deltas)
        body = adam.step(body, mean) if adam else jax.tree.map(lambda b, d: b - server_lr * d, body, mean)
    return body, heads


def check(pb, p0, body, heads, atol=1e-5):
    t = pb.trainer
    got = as64(t.params)
    for a, b in zip(jax.tree.leaves(got["body"]), jax.tree.leaves(body)):
        np.testing.assert_allclose(a, b, atol=atol)
    for a, b in zip(jax.tree.leaves(got["head"]), jax.tree.leaves(p0["head"])):
        np.testing.assert_array_equal(a, b)  # the server's head is the initial one
    assert set(heads) == {c for c in pb.ids if c in t.client_states}
    for cid, head in heads.items():
        stored = as64(t.client_states.get(cid))
        assert list(stored) == ["head"]
        for a, b in zip(jax.tree.leaves(stored["head"]), jax.tree.leaves(head)):
            np.testing.assert_allclose(a, b, atol=atol)
        personal = as64(t.algorithm.personal_params(t.server_state, t.client_states.get(cid)))
        for a, b in zip(jax.tree.leaves(personal), jax.tree.leaves({"body": got["body"], "head": stored["head"]})):
            np.testing.assert_array_equal(a, b)


REGIMES = {"below_an_epoch": dict(batch_size=2, local_epochs=None, local_steps=2),
           "one_epoch": dict(batch_size=4),
           "three_epochs": dict(batch_size=4, local_epochs=3)}


def problem(regime, rounds=3):
    return Problem(num_clients=4, seed=2, rounds=rounds, clients_per_round=3, **REGIMES[regime])


@pytest.mark.parametrize("regime", list(REGIMES))
def test_fedper_matches_numpy(regime):
    pb = problem(regime)
    p0 = train(pb, fedper(optax.sgd(LR), is_head, optax.sgd(0.8)))
    assert any(set(pb.ids) - set(c) for c in pb.cohorts)  # partial participation
    body, heads = reference(pb, p0, server_lr=0.8)
    check(pb, p0, body, heads)
    # a client that skipped a round came back with its head: the reference restores it the same way
    skipped = [c for c in pb.ids if sum(c in k for k in pb.cohorts) >= 2 and any(c not in k for k in pb.cohorts[:-1])]
    assert skipped


@pytest.mark.parametrize("regime,head_steps", [("below_an_epoch", 1), ("one_epoch", 1), ("three_epochs", 4),
                                               ("three_epochs", 7)])
def test_fedrep_matches_numpy(regime, head_steps):
    pb = problem(regime)
    p0 = train(pb, fedrep(optax.sgd(LR), ["head"], head_steps))
    body, heads = reference(pb, p0, head_steps=head_steps)
    check(pb, p0, body, heads)
    steps = pb.spec.steps(np.array([len(c["y"]) for c in pb.clients.values()]))
    if head_steps == 7:  # some clients train their heads only (weight 0), others also their bodies
        assert steps.min() <= 7 < steps.max()


def test_fedper_with_adam_on_the_server_matches_numpy():
    pb = problem("one_epoch")
    p0 = train(pb, fedper(optax.sgd(LR), "^head/", optax.adam(0.05)))
    body, heads = reference(pb, p0, adam=Adam(0.05))
    check(pb, p0, body, heads)
    assert jax.tree.structure(pb.trainer.server_state.opt_state[0].mu) == jax.tree.structure(
        jax.tree.map(lambda x: 0, {"body": {"bias": 0, "kernel": 0}}))  # adam's moments cover the body only


def test_backends_agree():
    pb = problem("one_epoch", rounds=2)
    runs = []
    for backend, lanes in [("scan", None), ("vmap", 2), ("debug", None)]:
        train(pb, fedrep(optax.sgd(LR, momentum=0.5), is_head, 2, head_tx=optax.adam(0.01)), backend=backend,
              lanes=lanes)
        runs.append(pb.trainer)
    for t in runs[1:]:
        for a, b in zip(jax.tree.leaves(t.server_state), jax.tree.leaves(runs[0].server_state)):
            np.testing.assert_allclose(a, b, atol=1e-5)
        for cid in pb.ids:
            for a, b in zip(jax.tree.leaves(t.client_states.get(cid)), jax.tree.leaves(runs[0].client_states.get(cid))):
                np.testing.assert_allclose(a, b, atol=1e-5)


def test_fedrep_is_not_fedper():
    pb = problem("three_epochs", rounds=2)
    train(pb, fedrep(optax.sgd(LR), is_head, 3))
    rep = as64(pb.trainer.params)["body"]["kernel"]
    train(pb, fedper(optax.sgd(LR), is_head))
    per = as64(pb.trainer.params)["body"]["kernel"]
    assert np.max(np.abs(rep - per)) > 1e-3


# ------------------------------------------------------------------------------------- the local part stays local
def test_the_aggregator_sees_the_body_only():
    seen, inits = [], []

    def client(update, weight, rng, state):
        seen.append([tuple(str(k.key) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(update)[0]])
        return update, weight, ()

    def server(total, side, rng, state, ctx):
        return total, state, ctx, {}

    def init(params):
        inits.append(sorted(params))
        return jnp.zeros(())

    spy = agg.chain(Stage("spy", client, server, init), agg.weighted_mean())
    pb = problem("one_epoch", rounds=2)
    p0 = train(pb, fedper(optax.sgd(LR), is_head, aggregator=spy))
    assert inits == [["body"]]  # a stateful stage is initialised on the global part
    assert seen and all(paths == [("body", "bias"), ("body", "kernel")] for paths in seen)
    t = pb.trainer
    assert sorted(t.algorithm.broadcast(t.server_state, None)) == ["body"]  # clients receive the body only
    for a, b in zip(jax.tree.leaves(as64(t.params)["head"]), jax.tree.leaves(p0["head"])):
        np.testing.assert_array_equal(a, b)
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(as64(t.params)["body"]),
                                                           jax.tree.leaves(p0["body"]))) > 1e-3


def test_heads_differ_per_client_and_a_never_trained_client_keeps_the_initial_head():
    pb = Problem(num_clients=5, seed=3, rounds=2, clients_per_round=2, batch_size=4)
    p0 = train(pb, fedper(optax.sgd(LR), is_head))
    t = pb.trainer
    trained = [c for c in pb.ids if c in t.client_states]
    assert 2 <= len(trained) < 5
    heads = [as64(t.client_states.get(c))["head"]["kernel"] for c in trained]
    assert min(np.max(np.abs(a - b)) for i, a in enumerate(heads) for b in heads[i + 1:]) > 1e-4
    never = next(c for c in pb.ids if c not in t.client_states)
    np.testing.assert_array_equal(as64(t.client_states.get(never))["head"]["kernel"], p0["head"]["kernel"])
    # the evaluator's call: vmapped over stacked client states
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[t.client_states.get(c) for c in trained])
    personal = jax.jit(jax.vmap(t.algorithm.personal_params, in_axes=(None, 0)))(t.server_state, stacked)
    np.testing.assert_allclose(pure(personal)["head"]["kernel"][1], heads[1], atol=1e-7)
    np.testing.assert_array_equal(pure(personal)["body"]["kernel"][0], pure(t.params)["body"]["kernel"])


@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_fedbn_keeps_normalization_parameters_on_the_clients(norm):
    pb = Problem(num_clients=4, seed=2, rounds=3, clients_per_round=3, batch_size=4)
    t = fedtrain.FederatedTrainer(NormNet(norm, rngs=nnx.Rngs(1)), pb.data, fedbn(optax.sgd(LR)), seed=5)
    p0 = as64(t.params)
    t.fit(rounds=3, clients_per_round=3, batch_size=4, verbose=0)
    got = as64(t.params)
    for a, b in zip(jax.tree.leaves(got["norm"]), jax.tree.leaves(p0["norm"])):
        np.testing.assert_array_equal(a, b)  # never changed on the server
    for layer in ("body", "head"):
        assert np.max(np.abs(got[layer]["kernel"] - p0[layer]["kernel"])) > 1e-4
    trained = [c for c in pb.ids if c in t.client_states]
    states = [as64(t.client_states.get(c)) for c in trained]
    assert all(list(s) == ["norm"] and sorted(s["norm"]) == ["bias", "scale"] for s in states)
    assert min(np.max(np.abs(a["norm"]["scale"] - b["norm"]["scale"]))
               for i, a in enumerate(states) for b in states[i + 1:]) > 1e-5
    assert all(np.max(np.abs(s["norm"]["bias"] - p0["norm"]["bias"])) > 1e-5 for s in states)
    # FedBN is FedPer with the normalization layers as the local part
    same = fedtrain.FederatedTrainer(NormNet(norm, rngs=nnx.Rngs(1)), pb.data, fedper(optax.sgd(LR), ["norm"]), seed=5)
    same.fit(rounds=3, clients_per_round=3, batch_size=4, verbose=0)
    for a, b in zip(jax.tree.leaves(same.server_state), jax.tree.leaves(t.server_state)):
        np.testing.assert_array_equal(a, b)


def test_checkpoint_resume_is_bit_exact_with_client_states(tmp_path):
    pb = Problem(num_clients=5, seed=2)
    fit = dict(clients_per_round=2, batch_size=4, verbose=0)

    def trainer():
        return fedtrain.FederatedTrainer(TwoLayer(rngs=nnx.Rngs(4)), pb.data,
                                         fedrep(optax.sgd(LR), is_head, 2, optax.adam(0.05)), seed=3)

    straight, first, resumed = straight_and_resumed(trainer, tmp_path, **fit)
    leaves = jax.tree.leaves
    assert all(np.array_equal(a, b) for a, b in zip(leaves(resumed.server_state), leaves(straight.server_state)))
    rows, expected = resumed.client_states.state_dict(), straight.client_states.state_dict()
    assert rows.keys() == expected.keys() and len(rows) >= 2
    assert all(np.array_equal(a, b) for a, b in zip(leaves(rows), leaves(expected)))
    assert not all(np.array_equal(a, b) for a, b in zip(leaves(resumed.server_state), leaves(first.server_state)))


# ------------------------------------------------------------------------------------- the partition
def test_partition_split_and_merge():
    params = fedtrain.models.from_nnx(NormNet(rngs=nnx.Rngs(0))).init_params
    assert param_paths(params) == [("body", "bias"), ("body", "kernel"), ("head", "bias"), ("head", "kernel"),
                                   ("norm", "bias"), ("norm", "scale")]
    for local in (is_head, "^head/", ["head"], [("head", "bias"), "head/kernel"]):
        p = partition(params, local)
        g, l = p.split(params)
        assert sorted(g) == ["body", "norm"] and sorted(l) == ["head"] and sorted(l["head"]) == ["bias", "kernel"]
        merged = p.merge(g, l)
        assert jax.tree.structure(merged) == jax.tree.structure(params)
        assert all(a is b for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)))
    assert partition(params, ["head/bias"]).local == (False, False, True, False, False, False)
    assert partition(params, is_norm_path).local == (False,) * 4 + (True, True)


def test_default_normalization_names():
    for name in ("norm", "layernorm", "BatchNorm_0", "stem_norm", "norm1", "bn", "bn2", "conv_bn", "ln_f", "gn1"):
        assert is_norm_path((name, "scale")), name
    for name in ("head", "dense", "bnx", "kernel", "lnk", "body"):
        assert not is_norm_path((name, "scale")), name
    assert not is_norm_path(("blocks", "0", "bias"))


def test_bad_partitions_fail_when_the_algorithm_is_built_for_the_params():
    params = fedtrain.models.from_nnx(TwoLayer(rngs=nnx.Rngs(0))).init_params
    cases = [(lambda p: False, "selects no parameter"), (lambda p: True, "selects every parameter"),
             ("^tail/", "selects no parameter"), (["heads"], r"prefix 'heads' names no parameter of the model; "
                                                            r"its top-level paths are 'body', 'head'"),
             (["head/weights"], "prefix 'head/weights' names no parameter")]
    for local, match in cases:
        with pytest.raises(ValueError, match=match):
            fedper(optax.sgd(0.1), local).init(params)
        with pytest.raises(ValueError, match=match):
            fedrep(optax.sgd(0.1), local, 1).init(params)
    # the trainer builds the server state before anything compiles and names the algorithm
    data = Problem().data
    with pytest.raises(TypeError, match="algorithm 'fedper' cannot be initialised.*'body', 'head'"):
        fedtrain.FederatedTrainer(TwoLayer(rngs=nnx.Rngs(0)), data, fedper(optax.sgd(0.1), ["heads"]))
    # a model without normalization layers gives FedBN nothing to keep local
    with pytest.raises(TypeError, match="fedbn.*selects no parameter"):
        fedtrain.FederatedTrainer(TwoLayer(rngs=nnx.Rngs(0)), data, fedbn(optax.sgd(0.1)))


def test_bad_arguments_fail_at_construction():
    with pytest.raises(ValueError, match="head_steps to be an int >= 1"):
        fedrep(optax.sgd(0.1), is_head, 0)
    with pytest.raises(ValueError, match="head_steps to be an int >= 1"):
        fedrep(optax.sgd(0.1), is_head, 2.5)
    with pytest.raises(TypeError, match="a function of the parameter path"):
        fedper(optax.sgd(0.1), 3)
    with pytest.raises(TypeError, match="a function of the parameter path"):
        fedper(optax.sgd(0.1), [])
    with pytest.raises(ValueError, match="not a valid regular expression"):
        fedper(optax.sgd(0.1), "head(")
    with pytest.raises(ValueError, match="must not be empty"):
        fedper(optax.sgd(0.1), ["head", ""])
