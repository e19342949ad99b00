"""Every algorithm: the contract (finite, shapes, backends agree, empty clients, save/restore),
a NumPy reference of its update rule, and behaviour where the theory says what happens."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import fedtrain
from fedtrain import aggregators as agg
from fedtrain.algorithms import ClientOut
from fedtrain.algorithms import (agnostic_fedavg, apfl, ditto, dp_fedavg, fedadam, fedavg, fedprox, hypcluster, mime,
                                 mime_lite, qffl, scaffold)
from fedtrain.engine.plan import BatchSpec, client_rng, example_order
from tests.conftest import Linear, make_clients, run_engine_round

A = fedtrain.algorithms

ALGORITHMS = {
    "fedavg": lambda: fedavg(optax.sgd(0.1)),
    "fedadam": lambda: fedadam(optax.sgd(0.1), server_learning_rate=0.05),
    "fedprox": lambda: fedprox(optax.sgd(0.1), mu=0.5),
    "scaffold": lambda: scaffold(0.1),
    "scaffold_injected_sgd": lambda: scaffold(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)),
    "mime": lambda: mime(optax.sgd(0.1, momentum=0.9)),
    "mime_lite": lambda: mime_lite(optax.adam(0.02), client_delta_clip_norm=0.5),
    "mime_lite_first_batch": lambda: mime_lite(optax.sgd(0.1, momentum=0.9), full_batch_gradient=False),
    "agnostic_fedavg": lambda: agnostic_fedavg(optax.sgd(0.1), [0.5, 0.5], domain_learning_rate=0.5),
    "hypcluster": lambda: hypcluster(optax.sgd(0.1), 2, init_noise=0.1),
    "dp_fedavg": lambda: dp_fedavg(optax.sgd(0.1), noise_multiplier=0.3, clip_norm=0.5, expected_clients_per_round=4),
    "dp_fedavg_adaptive": lambda: dp_fedavg(optax.sgd(0.1), 0.3, 0.5, 4, adaptive_clipping=True, count_stddev=1.0),
    "apfl": lambda: apfl(optax.sgd(0.1), alpha=0.3),
    "ditto": lambda: ditto(optax.sgd(0.1), lam=0.5),
    "qffl": lambda: qffl(optax.sgd(0.1), q=1.0, lipschitz=10.0),
    "fedavg_rotated_quantization": lambda: fedavg(optax.sgd(0.1), aggregator=agg.chain(agg.rotated_quantization(16),
                                                                                       agg.weighted_mean())),
}


def domain_clients(**kw):
    clients = make_clients(**kw)
    for c in clients.values():
        c["domain_id"] = (c["x"][:, 0] > 0).astype(np.int32)
    return clients


def pure(tree):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree)


def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def trainer_for(name, data, backend="scan", seed=3, **kw):
    return fedtrain.FederatedTrainer(Linear(features=8, rngs=nnx.Rngs(0)), data, ALGORITHMS[name](),
                                     backend=backend, seed=seed, **kw)


FIT = dict(clients_per_round=4, batch_size=4, verbose=0)


# ------------------------------------------------------------------------------------- contract
@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_contract(name):
    data = fedtrain.InMemoryFederatedData(domain_clients(num_clients=8, max_size=14))
    scan = trainer_for(name, data, "scan")
    scan.fit(rounds=1, **FIT)
    saved = jax.tree.map(np.array, scan.state_dict())  # what a checkpoint holds, as host arrays
    scan.fit(rounds=2, **FIT)
    runs = {"scan": scan}
    for backend in ["vmap", "debug"]:
        runs[backend] = trainer_for(name, data, backend, lanes=2 if backend == "vmap" else None)
        runs[backend].fit(rounds=2, **FIT)
    init_state = scan.algorithm.init(scan.model_fns.init_params)
    # finite values of the right shapes
    assert jax.tree.structure(scan.server_state) == jax.tree.structure(init_state)
    for a, b in zip(jax.tree.leaves(scan.server_state), jax.tree.leaves(init_state)):
        assert np.shape(a) == np.shape(b) and np.all(np.isfinite(np.asarray(a, np.float64)))
    assert all(np.isfinite(v) for vals in scan.history.history.values() for v in vals)
    assert max_diff(scan.params, scan.model_fns.init_params) > 1e-4, "training did not move the model"
    # every backend agrees
    for backend in ["vmap", "debug"]:
        assert max_diff(scan.server_state, runs[backend].server_state) < 1e-5, backend
        np.testing.assert_allclose(scan.history.history["loss"], runs[backend].history.history["loss"], rtol=1e-5)
    if scan.client_states is not None:
        for cid in data.client_ids:
            assert max_diff(scan.client_states.get(cid), runs["debug"].client_states.get(cid)) < 1e-5
    # state survives a save/restore round trip (resumed on the uncompiled backend, which agrees to 1e-5)
    resumed = trainer_for(name, data, "debug")
    resumed.load_state_dict(saved)
    resumed.fit(rounds=2, **FIT)
    assert resumed.round == 2 and len(resumed.history.history["loss"]) == 2
    assert max_diff(resumed.server_state, scan.server_state) < 1e-5


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_padded_empty_client_changes_nothing(name):
    clients = domain_clients(num_clients=5, max_size=14)
    ids = list(clients)[:4]
    empty = {"x": np.zeros((0, 8), np.float32), "y": np.zeros((0,), np.int32), "domain_id": np.zeros((0,), np.int32)}

    def one_round(cohort, extra_capacity, lanes):  # same population in both runs (SCAFFOLD's N)
        return run_engine_round(clients, cohort, ALGORITHMS[name](), lanes=lanes, extra_capacity=extra_capacity,
                                empty=empty)[1]

    base = one_round(ids, 0, 1)
    for lanes in (1, 2):
        padded = one_round(ids + ["empty"], 5, lanes)
        assert max_diff(base.server_state, padded.server_state) < 1e-6, lanes
        assert padded.client_metrics["num_examples"][4] == 0 and np.isnan(padded.client_metrics["loss"][4])
        assert padded.client_logs()[4]["num_examples"] == 0


# ------------------------------------------------------------------------------------- NumPy references
CLIENT_LR = 0.3


def softmax_grad(w, b, x, y):
    """Mean softmax cross-entropy gradient over the batch."""
    logits = x @ w + b
    logits = logits - logits.max(-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(-1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    return x.T @ p / len(y), p.sum(0) / len(y)


def softmax_losses(w, b, x, y):
    logits = x @ w + b
    m = logits.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[:, 0]
    return lse - logits[np.arange(len(y)), y]


class Problem:
    """A tiny federated softmax regression (linear model) and the library's batch order."""

    def __init__(self, num_clients=3, seed=1, domains=False, rounds=2, clients_per_round=None, batch_size=4,
                 local_epochs=1, local_steps=None):
        self.clients = (domain_clients if domains else make_clients)(num_clients=num_clients, features=4, classes=3,
                                                                     min_size=5, max_size=11, seed=seed)
        self.data = fedtrain.InMemoryFederatedData(self.clients)
        self.ids = list(self.clients)
        self.spec = BatchSpec(batch_size, local_epochs=local_epochs, local_steps=local_steps)
        self.rounds = rounds
        self.k = clients_per_round or num_clients

    def train(self, algorithm, seed=7, backend="scan"):
        cohorts = []
        t = fedtrain.FederatedTrainer(Linear(rngs=nnx.Rngs(4)), self.data, algorithm, backend=backend, seed=seed)
        p0 = pure(t.params)["dense"]
        self.state0 = t.server_state
        t.fit(rounds=self.rounds, clients_per_round=self.k, batch_size=self.spec.batch_size,
              local_epochs=self.spec.local_epochs, local_steps=self.spec.local_steps, verbose=0,
              callbacks=[fedtrain.callbacks.LambdaCallback(on_clients_sampled=lambda r, ids: cohorts.append(ids))])
        self.trainer, self.seed, self.cohorts = t, seed, cohorts
        return p0["kernel"].astype(np.float64), p0["bias"].astype(np.float64)

    def xy(self, cid):
        return self.clients[cid]["x"].astype(np.float64), self.clients[cid]["y"]

    def batches(self, cid, r):
        """Index arrays of the client's batches in round ``r``, in the library's order."""
        n = len(self.clients[cid]["y"])
        steps = int(self.spec.steps(n))
        order = example_order(n, self.spec, steps, client_rng(self.seed, r, self.ids.index(cid)))
        return [batch[batch >= 0] for batch in order.reshape(steps, self.spec.batch_size)]

    def check(self, w, b, atol=1e-5):
        got = pure(self.trainer.params)["dense"]
        np.testing.assert_allclose(got["kernel"], w, atol=atol)
        np.testing.assert_allclose(got["bias"], b, atol=atol)


def local_sgd(w, b, x, y, batches, lr, grad_fn=None):
    for idx in batches:
        gw, gb = (grad_fn or (lambda w, b, i: softmax_grad(w, b, x[i], y[i])))(w, b, idx)
        w, b = w - lr * gw, b - lr * gb
    return w, b


def test_fedprox_matches_numpy():
    mu, pb = 0.7, Problem()
    w, b = pb.train(fedprox(optax.sgd(CLIENT_LR), mu=mu, server_tx=optax.sgd(0.8)))
    for r, cohort in enumerate(pb.cohorts):
        dw, db, ns = [], [], []
        for cid in cohort:
            x, y = pb.xy(cid)

            def g(cw, cb, i):
                gw, gb = softmax_grad(cw, cb, x[i], y[i])
                return gw + mu * (cw - w), gb + mu * (cb - b)
            cw, cb = local_sgd(w, b, x, y, pb.batches(cid, r), CLIENT_LR, g)
            dw.append(w - cw), db.append(b - cb), ns.append(len(y))
        ns = np.array(ns, float)
        w = w - 0.8 * np.tensordot(ns, dw, 1) / ns.sum()
        b = b - 0.8 * np.tensordot(ns, db, 1) / ns.sum()
    pb.check(w, b)


SCAFFOLD_CLIENT_TX = {
    "float": lambda lr: lr,
    "optax_sgd": optax.sgd,
    "injected_sgd": lambda lr: optax.inject_hyperparams(optax.sgd)(learning_rate=lr),
}


@pytest.mark.parametrize("client_tx", list(SCAFFOLD_CLIENT_TX))
def test_scaffold_matches_numpy_with_partial_participation(client_tx):
    pb = Problem(num_clients=4, rounds=3, clients_per_round=2)
    w, b = pb.train(scaffold(SCAFFOLD_CLIENT_TX[client_tx](CLIENT_LR), server_learning_rate=0.9))
    N = 4
    c = (np.zeros_like(w), np.zeros_like(b))
    ci = {cid: (np.zeros_like(w), np.zeros_like(b)) for cid in pb.ids}
    for r, cohort in enumerate(pb.cohorts):
        dws, dbs, dcs = [], [], []
        for cid in cohort:
            x, y = pb.xy(cid)
            corr = (c[0] - ci[cid][0], c[1] - ci[cid][1])

            def g(cw, cb, i):
                gw, gb = softmax_grad(cw, cb, x[i], y[i])
                return gw + corr[0], gb + corr[1]
            batches = pb.batches(cid, r)
            cw, cb = local_sgd(w, b, x, y, batches, CLIENT_LR, g)
            K = len(batches)
            new = (ci[cid][0] - c[0] + (w - cw) / (K * CLIENT_LR), ci[cid][1] - c[1] + (b - cb) / (K * CLIENT_LR))
            dcs.append((new[0] - ci[cid][0], new[1] - ci[cid][1]))
            ci[cid] = new
            dws.append(w - cw), dbs.append(b - cb)
        w, b = w - 0.9 * np.mean(dws, 0), b - 0.9 * np.mean(dbs, 0)
        c = (c[0] + sum(d[0] for d in dcs) / N, c[1] + sum(d[1] for d in dcs) / N)
    pb.check(w, b)
    got_c = pure(pb.trainer.server_state.control)["dense"]
    np.testing.assert_allclose(got_c["kernel"], c[0], atol=1e-5)
    for cid in pb.ids:
        np.testing.assert_allclose(pure(pb.trainer.client_states.get(cid))["dense"]["bias"], ci[cid][1], atol=1e-5)


# Regimes a user can reach: one epoch, local steps below one epoch (clients of 5-11 examples, batch 4:
# 1 of 2-3 batches), several epochs. A prepass (full-batch gradient, domain losses, cluster choice)
# always covers the client's whole dataset once.
REGIMES = {"one_epoch": {}, "one_step": dict(local_steps=1), "three_epochs": dict(local_epochs=3)}


@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("full,full_batch", [(False, True), (True, True), (False, False)],
                         ids=["mime_lite", "mime", "mime_lite_first_batch"])
def test_mime_matches_numpy(full, full_batch, regime):
    beta, server_lr, clip = 0.8, 0.9, 0.4
    pb = Problem(rounds=3, **REGIMES[regime])
    base_tx = optax.sgd(CLIENT_LR, momentum=beta)
    w, b = pb.train(mime(base_tx, server_lr) if full else
                    mime_lite(base_tx, server_lr, client_delta_clip_norm=clip, full_batch_gradient=full_batch))
    m = (np.zeros_like(w), np.zeros_like(b))  # server momentum trace, frozen on clients
    for r, cohort in enumerate(pb.cohorts):
        # full-batch gradients at the server model, weighted by examples
        grads = []
        for cid in cohort:
            x, y = pb.xy(cid)
            idx = np.arange(len(y)) if full_batch else pb.batches(cid, r)[0]
            gw, gb = softmax_grad(w, b, x[idx], y[idx])
            grads.append((gw * len(idx), gb * len(idx), len(idx)))
        n_all = sum(g[2] for g in grads)
        c = (sum(g[0] for g in grads) / n_all, sum(g[1] for g in grads) / n_all)
        dws, dbs, ns = [], [], []
        for cid in cohort:
            x, y = pb.xy(cid)

            def g(cw, cb, i):
                gw, gb = softmax_grad(cw, cb, x[i], y[i])
                if full:
                    ow, ob = softmax_grad(w, b, x[i], y[i])
                    gw, gb = gw - ow + c[0], gb - ob + c[1]
                return gw + beta * m[0], gb + beta * m[1]
            cw, cb = local_sgd(w, b, x, y, pb.batches(cid, r), CLIENT_LR, g)
            dw, db = w - cw, b - cb
            if not full:
                norm = np.sqrt((dw ** 2).sum() + (db ** 2).sum())
                dw, db = dw * min(1, clip / norm), db * min(1, clip / norm)
            dws.append(dw), dbs.append(db), ns.append(len(y))
        ns = np.array(ns, float)
        m = (c[0] + beta * m[0], c[1] + beta * m[1])
        w = w - server_lr * np.tensordot(ns, dws, 1) / ns.sum()
        b = b - server_lr * np.tensordot(ns, dbs, 1) / ns.sum()
    pb.check(w, b)


@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("domains", ["mixed", "one_absent"])
def test_agnostic_fedavg_matches_numpy(regime, domains):
    if domains == "mixed":
        eta, pb = 0.5, Problem(domains=True, rounds=3, **REGIMES[regime])
    else:  # domain 1 lives on client 0 only: one client per round, so most rounds see no domain-1 example
        eta, pb = 0.5, Problem(domains=True, rounds=4, clients_per_round=1, **REGIMES[regime])
        for i, cid in enumerate(pb.ids):
            pb.clients[cid]["domain_id"] = np.full_like(pb.clients[cid]["domain_id"], int(i == 0))
        pb.data = fedtrain.InMemoryFederatedData(pb.clients)
    w, b = pb.train(agnostic_fedavg(optax.sgd(CLIENT_LR), [0.3, 0.7], eta, server_tx=optax.sgd(0.9)))
    if domains == "one_absent":
        assert any(pb.ids[0] not in cohort for cohort in pb.cohorts[:-1])  # a round without domain 1
    lam, window = np.array([0.3, 0.7]), np.ones(2)
    for r, cohort in enumerate(pb.cohorts):
        alpha = np.divide(lam, window, out=lam.copy(), where=window > 0)  # an absent domain keeps alpha = lambda
        dws, dbs, betas, L, N = [], [], [], np.zeros(2), np.zeros(2)
        for cid in cohort:
            x, y = pb.xy(cid)
            d = pb.clients[cid]["domain_id"]
            losses = softmax_losses(w, b, x, y)
            Li, Ni = np.bincount(d, losses, 2), np.bincount(d, minlength=2).astype(float)
            beta = alpha @ Ni
            L, N = L + Li, N + Ni

            def g(cw, cb, i):
                gw, gb = softmax_grad(cw, cb, x[i], y[i])  # mean over the batch
                # per-example gradients weighted by alpha[domain] / beta
                logits = x[i] @ cw + cb
                p = np.exp(logits - logits.max(-1, keepdims=True))
                p /= p.sum(-1, keepdims=True)
                p[np.arange(len(i)), y[i]] -= 1.0
                s = alpha[d[i]][:, None] / beta
                return x[i].T @ (p * s), (p * s).sum(0)
            cw, cb = local_sgd(w, b, x, y, pb.batches(cid, r), CLIENT_LR, g)
            dws.append(w - cw), dbs.append(b - cb), betas.append(beta)
        betas = np.array(betas)
        w = w - 0.9 * np.tensordot(betas, dws, 1) / betas.sum()
        b = b - 0.9 * np.tensordot(betas, dbs, 1) / betas.sum()
        lam = lam * np.exp(eta * np.divide(L, N, out=np.zeros(2), where=N > 0))
        lam, window = lam / lam.sum(), N
    assert np.all(np.isfinite(lam))
    pb.check(w, b)
    np.testing.assert_allclose(pb.trainer.server_state.domain_weights, lam, atol=1e-5)
    assert pb.trainer.history.history["domain_weight_1"][-1] == pytest.approx(lam[1], abs=1e-5)


@pytest.mark.parametrize("regime", list(REGIMES))
def test_hypcluster_matches_numpy(regime):
    pb = Problem(num_clients=3, rounds=3, **REGIMES[regime])
    pb.train(hypcluster(optax.sgd(CLIENT_LR), 2, server_tx=optax.sgd(0.9), init_noise=0.5, seed=2))
    stacked = pure(pb.state0.params)["dense"]
    W, B = stacked["kernel"].astype(np.float64), stacked["bias"].astype(np.float64)
    chosen_any = set()
    for r, cohort in enumerate(pb.cohorts):
        sums = [(np.zeros_like(W[0]), np.zeros_like(B[0]), 0.0) for _ in range(2)]
        for cid in cohort:
            x, y = pb.xy(cid)
            j = int(np.argmin([softmax_losses(W[k], B[k], x, y).sum() for k in range(2)]))
            chosen_any.add(j)
            cw, cb = local_sgd(W[j], B[j], x, y, pb.batches(cid, r), CLIENT_LR)
            n = len(y)
            sums[j] = (sums[j][0] + n * (W[j] - cw), sums[j][1] + n * (B[j] - cb), sums[j][2] + n)
        for j in range(2):
            if sums[j][2] > 0:
                W[j] = W[j] - 0.9 * sums[j][0] / sums[j][2]
                B[j] = B[j] - 0.9 * sums[j][1] / sums[j][2]
    got = pure(pb.trainer.server_state.params)["dense"]
    np.testing.assert_allclose(got["kernel"], W, atol=1e-5)
    np.testing.assert_allclose(got["bias"], B, atol=1e-5)
    np.testing.assert_allclose(pure(A.cluster_params(pb.trainer.server_state, 1))["dense"]["bias"], B[1], atol=1e-5)


def test_hypcluster_evaluates_each_client_on_its_lowest_loss_cluster():
    pb = Problem(num_clients=6, rounds=12, seed=5)
    for i, cid in enumerate(pb.ids):  # two populations with permuted labels: one model cannot fit both
        if i % 2:
            pb.clients[cid]["y"] = (pb.clients[cid]["y"] + 1) % 3
    pb.data = fedtrain.InMemoryFederatedData(pb.clients)
    pb.train(hypcluster(optax.sgd(0.2), 2, init_noise=1.0, seed=1))
    fresh = make_clients(num_clients=13, features=4, classes=3, min_size=5, max_size=11, seed=5)  # same task
    test = {cid: fresh[f"client_{6 + i:03d}"] for i, cid in enumerate(pb.ids + ["newcomer"])}
    for i, cid in enumerate(pb.ids):
        if i % 2:
            test[cid]["y"] = (test[cid]["y"] + 1) % 3
    logs = pb.trainer.evaluate(fedtrain.InMemoryFederatedData(test))
    stacked = pure(pb.trainer.server_state.params)["dense"]
    W, B = stacked["kernel"].astype(np.float64), stacked["bias"].astype(np.float64)
    loss = correct = count = 0.0
    choices = []
    for cid, c in test.items():
        sel = pb.clients.get(cid, c)  # selection on the training data; the newcomer on its own
        j = int(np.argmin([softmax_losses(W[k], B[k], sel["x"].astype(np.float64), sel["y"]).mean()
                           for k in range(2)]))
        choices.append(j)
        x, y = c["x"].astype(np.float64), c["y"]
        loss += softmax_losses(W[j], B[j], x, y).sum()
        correct += np.sum(np.argmax(x @ W[j] + B[j], -1) == y)
        count += len(y)
    assert set(choices) == {0, 1}, "the clusters did not specialise; the test would not tell the models apart"
    assert logs["loss"] == pytest.approx(loss / count, rel=1e-5)
    assert logs["accuracy"] == pytest.approx(correct / count, rel=1e-6)
    assert logs["model_share_1"] == pytest.approx(np.mean(choices))
    cluster0 = pb.trainer._evaluator.evaluate(pb.trainer.params, fedtrain.InMemoryFederatedData(test))
    assert logs["loss"] < cluster0["loss"]


@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed", "adaptive"])
def test_dp_fedavg_matches_numpy_without_noise(adaptive):
    clip, expected, pb = 0.3, 4.0, Problem(rounds=3)
    with pytest.warns(RuntimeWarning, match="expected_clients_per_round=4"):  # cohorts of 3: the fixed
        w, b = pb.train(dp_fedavg(optax.sgd(CLIENT_LR), 0.0, clip, expected, server_learning_rate=0.9,  # denominator
                                  adaptive_clipping=adaptive, target_quantile=0.4, clip_learning_rate=0.5))
    clips = []
    for r, cohort in enumerate(pb.cohorts):
        total_w, total_b, unclipped = 0, 0, 0
        for cid in cohort:
            x, y = pb.xy(cid)
            cw, cb = local_sgd(w, b, x, y, pb.batches(cid, r), CLIENT_LR)
            dw, db = w - cw, b - cb
            norm = np.sqrt((dw ** 2).sum() + (db ** 2).sum())
            unclipped += norm <= clip
            total_w, total_b = total_w + dw * min(1, clip / norm), total_b + db * min(1, clip / norm)
        w, b = w - 0.9 * total_w / expected, b - 0.9 * total_b / expected  # fixed denominator, not 3
        clips.append(clip)
        if adaptive:
            # centred count, as in Andrew et al.: (sum_i (b_i - 1/2)) / expected + 1/2
            clip = clip * np.exp(-0.5 * ((unclipped - len(cohort) / 2) / expected + 0.5 - 0.4))
    pb.check(w, b)
    np.testing.assert_allclose(pb.trainer.history.history["clip_norm"], clips, rtol=1e-5)


# ------------------------------------------------------------------------------------- behaviour
def quadratic_clients(num_clients=4, dim=3, n=16, seed=0):
    """Least squares with very different curvature and optimum per client."""
    rng = np.random.default_rng(seed)
    clients = {}
    for i in range(num_clients):
        scale = np.exp(rng.uniform(-1.5, 1.5, dim))
        x = (rng.normal(size=(n, dim)) * scale).astype(np.float32)
        w_i = rng.normal(size=dim) * 3
        clients[f"c{i}"] = {"x": x, "y": (x @ w_i).astype(np.float32)}
    return clients


def squared_error():
    return fedtrain.metrics.Metric("loss", lambda batch, out: (0.5 * (out[:, 0] - batch["y"]) ** 2,
                                                               jnp.ones_like(batch["y"])))


class Affine(nnx.Module):
    def __init__(self, dim, *, rngs):
        self.dense = nnx.Linear(dim, 1, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.dense(x)


def test_scaffold_removes_client_drift_fedavg_suffers():
    clients = quadratic_clients()
    data = fedtrain.InMemoryFederatedData(clients)
    # the global optimum of the uniform mean of the clients' mean losses
    hess = sum(c["x"].T.astype(np.float64) @ c["x"] / len(c["x"]) for c in clients.values())
    rhs = sum(c["x"].T.astype(np.float64) @ c["y"] / len(c["x"]) for c in clients.values())
    w_star = np.linalg.solve(hess, rhs)

    def distance(algorithm):
        t = fedtrain.FederatedTrainer(Affine(3, rngs=nnx.Rngs(0)), data, algorithm, loss=squared_error(), metrics=[],
                                      backend="scan")
        t.fit(rounds=60, clients_per_round=4, batch_size=16, local_epochs=None, local_steps=20, verbose=0)
        return float(np.linalg.norm(pure(t.params)["dense"]["kernel"][:, 0] - w_star))

    lr = 0.02
    drift = distance(fedavg(optax.sgd(lr), aggregator=agg.mean()))
    exact = distance(scaffold(lr))
    assert drift > 0.1, f"FedAvg should drift on heterogeneous quadratics (distance {drift})"
    assert exact < 1e-2 and exact < drift / 20


def two_domain_clients(num_clients=8, n=40, minority=0.1, seed=0):
    """Two domains whose labels disagree on the same inputs; domain 1 is a small minority."""
    rng = np.random.default_rng(seed)
    clients = {}
    for i in range(num_clients):
        x = rng.normal(size=(n, 2)).astype(np.float32)
        d = (rng.random(n) < minority).astype(np.int32)
        y = np.where(d == 0, x[:, 0] > 0, x[:, 1] > 0).astype(np.int32)
        clients[f"c{i}"] = {"x": x, "y": y, "domain_id": d}
    return clients


def domain_accuracy(trainer, n=4000):
    """Accuracy on fresh examples of each domain."""
    x = np.random.default_rng(99).normal(size=(n, 2)).astype(np.float32)
    pred = trainer.predict(x).argmax(-1)
    return [float(np.mean(pred == (x[:, k] > 0))) for k in range(2)]


def test_agnostic_fedavg_raises_worst_domain_accuracy():
    clients = two_domain_clients()
    data = fedtrain.InMemoryFederatedData(clients)

    def accuracies(algorithm):
        t = fedtrain.FederatedTrainer(Linear(features=2, classes=2, rngs=nnx.Rngs(0)), data, algorithm,
                                      backend="scan")
        t.fit(rounds=60, clients_per_round=4, batch_size=20, verbose=0)
        return domain_accuracy(t)

    plain = accuracies(fedavg(optax.sgd(0.5)))
    agnostic = accuracies(agnostic_fedavg(optax.sgd(0.5), [0.5, 0.5], domain_learning_rate=0.5))
    assert plain[1] < plain[0] - 0.2, plain  # FedAvg serves the majority domain
    assert min(agnostic) > min(plain) + 0.05, (plain, agnostic)


def test_dp_fedavg_noise_reproducible_per_seed():
    data = fedtrain.InMemoryFederatedData(make_clients(num_clients=8))

    def run(seed):
        t = trainer_for("dp_fedavg", data, seed=seed)
        t.fit(rounds=2, **FIT)
        return t.params

    a, b, c = run(1), run(1), run(2)
    assert max_diff(a, b) == 0.0
    assert max_diff(a, c) > 1e-3


# ------------------------------------------------------------------------------------- bad input
def test_bad_hyperparameters_fail_at_construction():
    cases = [
        (lambda: fedprox(optax.sgd(0.1), mu=-0.1), "mu"),
        (lambda: scaffold(-0.1), "client_learning_rate"),
        (lambda: scaffold(0.0), "client_learning_rate"),
        (lambda: dp_fedavg(optax.sgd(0.1), -1.0, 1.0, 10), "noise_multiplier"),
        (lambda: dp_fedavg(optax.sgd(0.1), 1.0, -1.0, 10), "clip_norm"),
        (lambda: dp_fedavg(optax.sgd(0.1), 1.0, 1.0, 0), "expected_clients_per_round"),
        (lambda: dp_fedavg(optax.sgd(0.1), 1.0, 1.0, 10, adaptive_clipping=True, count_stddev=0.1), "count_stddev"),
        (lambda: agnostic_fedavg(optax.sgd(0.1), [0.2, 0.2], 0.1), "sum to 1"),
        (lambda: agnostic_fedavg(optax.sgd(0.1), [0.5, 0.5], -0.1), "domain_learning_rate"),
        (lambda: hypcluster(optax.sgd(0.1), 0), "num_clusters"),
        (lambda: hypcluster(optax.sgd(0.1), 2, aggregator=agg.median()), "coordinate-wise"),
        (lambda: mime_lite(optax.sgd(0.1), client_delta_clip_norm=-1.0), "client_delta_clip_norm"),
    ]
    for make, match in cases:
        with pytest.raises(ValueError, match=match):
            make()


def test_missing_domain_id_is_a_clear_error(data):
    t = fedtrain.FederatedTrainer(Linear(features=8, rngs=nnx.Rngs(0)), data, ALGORITHMS["agnostic_fedavg"]())
    began = []
    with pytest.raises(ValueError, match="domain_id.*features"):
        t.fit(rounds=1, **FIT, callbacks=[fedtrain.callbacks.LambdaCallback(on_train_begin=lambda logs: began.append(1))])
    assert t.round == 0 and began == []  # raised before any callback ran


def test_scaffold_population_comes_from_the_trainer_or_the_argument():
    data = fedtrain.InMemoryFederatedData(make_clients(num_clients=6))

    def control(**kw):
        t = fedtrain.FederatedTrainer(Linear(features=8, rngs=nnx.Rngs(0)), data, scaffold(0.1, **kw), seed=1)
        t.fit(rounds=1, **FIT)
        return pure(t.server_state.control)["dense"]["bias"]

    # c <- c + (1/N) sum_i dc_i: with N given as 12 instead of the 6 clients, the step halves
    np.testing.assert_allclose(control(num_clients=12), control() / 2, rtol=1e-5)


def test_scaffold_takes_optax_sgd_like_every_other_algorithm():
    data = fedtrain.InMemoryFederatedData(make_clients(num_clients=6))

    def run(algorithm, client_lr=None):
        t = fedtrain.FederatedTrainer(Linear(features=8, rngs=nnx.Rngs(0)), data, algorithm, seed=1)
        if client_lr is not None:
            t.set_hyperparam("learning_rate", client_lr, target="client")
        t.fit(rounds=2, **FIT)
        return t

    by_float = run(scaffold(0.1))
    by_tx = run(scaffold(optax.sgd(0.1)))
    assert by_tx.algorithm.hyperparams["client_learning_rate"] == pytest.approx(0.1)
    assert max_diff(by_float.server_state, by_tx.server_state) == 0.0
    assert max_diff(run(scaffold(client_learning_rate=0.1)).server_state, by_float.server_state) == 0.0
    # an injected rate set by the trainer (a client schedule) is the rate option II divides by
    injected = run(scaffold(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)), client_lr=0.05)
    assert max_diff(injected.server_state, run(scaffold(0.05)).server_state) < 1e-6
    for cid in data.client_ids:
        assert max_diff(injected.client_states.get(cid), run(scaffold(0.05)).client_states.get(cid)) < 1e-6


@pytest.mark.parametrize("client_tx", [
    optax.sgd(0.1, momentum=0.9), optax.sgd(0.1, momentum=0.9, nesterov=True), optax.adam(0.1),
    optax.sgd(optax.linear_schedule(0.1, 0.01, 100)), optax.sgd(optax.piecewise_constant_schedule(0.1, {50: 0.1})),
    optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(0.1)),
    optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1)),
], ids=["momentum", "nesterov", "adam", "schedule", "late_schedule", "weight_decay", "clipping"])
def test_scaffold_refuses_client_optimizers_other_than_plain_sgd(client_tx):
    with pytest.raises(ValueError, match=r"SCAFFOLD.*plain SGD.*optax.sgd\(learning_rate\)"):
        scaffold(client_tx)


def test_scaffold_client_tx_errors_name_the_fix():
    with pytest.raises(ValueError, match="learning rate > 0"):
        scaffold(optax.sgd(0.0))
    with pytest.raises(TypeError, match="optax.sgd"):
        scaffold("sgd")
    with pytest.raises(TypeError, match="not both"):
        scaffold(optax.sgd(0.1), client_learning_rate=0.1)
    with pytest.raises(TypeError, match="optax.sgd"):
        scaffold()


def malformed(**changes):
    return fedavg(optax.sgd(0.1))._replace(**changes)


@pytest.mark.parametrize("field,fn,match", [
    ("client_step", lambda local, batch: (local, {}), r"client_step.*client_step\(local, batch, ctx\)"),
    ("client_init", lambda bc, cs, ctx: bc, r"client_init\(broadcast, client_state, prepass, ctx\)"),
    ("server_update", lambda s, agg: (s, {}), r"server_update\(server_state, aggregate, stats, ctx\)"),
    ("broadcast", lambda s: s.params, r"broadcast\(server_state, ctx\)"),
])
def test_malformed_algorithm_names_the_function_and_its_signature(field, fn, match):
    with pytest.raises(TypeError, match=match):
        fedtrain.FederatedTrainer(Linear(features=8, rngs=nnx.Rngs(0)), None, malformed(**{field: fn}))


def test_algorithm_error_while_tracing_names_the_function(data):
    def client_final(bc, local, ctx):
        return ClientOut(local.params["no_such_layer"], ctx.num_examples)

    t = fedtrain.FederatedTrainer(Linear(features=8, rngs=nnx.Rngs(0)), data, malformed(client_final=client_final))
    began = []
    with pytest.raises(KeyError, match=r"client_final.*contract: client_final\(broadcast, local, ctx\)"):
        t.fit(rounds=1, **FIT, callbacks=[fedtrain.callbacks.LambdaCallback(on_train_begin=lambda logs: began.append(1))])
    assert began == []  # raised before any callback ran


def numpy_adam(b1=0.9, b2=0.99, eps=1e-3):
    def init(x):
        return (np.zeros_like(x), np.zeros_like(x), 0)

    def update(g, state, lr):
        m, v, t = state
        m, v, t = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g, t + 1
        return -lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps), (m, v, t)

    return init, update


def numpy_momentum(beta=0.9):
    def init(x):
        return np.zeros_like(x)

    def update(g, trace, lr):
        trace = g + beta * trace
        return -lr * trace, trace

    return init, update


@pytest.mark.parametrize("server", ["adam", "momentum"])
def test_hypcluster_keeps_one_server_optimizer_state_per_cluster(server):
    """A cluster no client chose keeps its model and its optimizer state (moments, step count)."""
    pb = Problem(num_clients=6, rounds=6, clients_per_round=2, seed=5)
    for i, cid in enumerate(pb.ids):  # two populations with permuted labels
        if i % 2:
            pb.clients[cid]["y"] = (pb.clients[cid]["y"] + 1) % 3
    pb.data = fedtrain.InMemoryFederatedData(pb.clients)
    lr = 0.3
    tx = optax.adam(lr, b1=0.9, b2=0.99, eps=1e-3) if server == "adam" else optax.sgd(lr, momentum=0.9)
    pb.train(hypcluster(optax.sgd(CLIENT_LR), 2, server_tx=tx, init_noise=1.0, seed=0), seed=1)
    init, update = numpy_adam() if server == "adam" else numpy_momentum()
    stacked = pure(pb.state0.params)["dense"]
    W, B = stacked["kernel"].astype(np.float64), stacked["bias"].astype(np.float64)
    opt = [(init(W[j]), init(B[j])) for j in range(2)]
    history = []
    for r, cohort in enumerate(pb.cohorts):
        sums = [(np.zeros_like(W[0]), np.zeros_like(B[0]), 0.0) for _ in range(2)]
        for cid in cohort:
            x, y = pb.xy(cid)
            j = int(np.argmin([softmax_losses(W[k], B[k], x, y).sum() for k in range(2)]))
            cw, cb = local_sgd(W[j], B[j], x, y, pb.batches(cid, r), CLIENT_LR)
            n = len(y)
            sums[j] = (sums[j][0] + n * (W[j] - cw), sums[j][1] + n * (B[j] - cb), sums[j][2] + n)
        history.append([sums[j][2] > 0 for j in range(2)])
        for j in range(2):
            if sums[j][2] > 0:
                uw, sw = update(sums[j][0] / sums[j][2], opt[j][0], lr)
                ub, sb = update(sums[j][1] / sums[j][2], opt[j][1], lr)
                W[j], B[j], opt[j] = W[j] + uw, B[j] + ub, (sw, sb)
    idle_then_chosen = any(not history[r][j] and any(h[j] for h in history[r + 1:])
                           for r in range(len(history)) for j in range(2))
    assert idle_then_chosen, "no cluster was idle and chosen later; the test would not see the idle cluster's state"
    got = pure(pb.trainer.server_state.params)["dense"]
    np.testing.assert_allclose(got["kernel"], W, atol=1e-5)
    np.testing.assert_allclose(got["bias"], B, atol=1e-5)
