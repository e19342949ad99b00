"""Ditto and q-FFL (q-FedAvg): float64 NumPy references of the papers' algorithms, and behaviour."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import fedtrain
from fedtrain.algorithms import fedavg
from fedtrain.algorithms.ditto import ditto
from fedtrain.algorithms.qffl import qffl
from fedtrain.aggregators import mean
from tests.conftest import Linear
from tests.test_algorithms import CLIENT_LR, REGIMES, Problem, local_sgd, numpy_adam, pure, softmax_grad, softmax_losses

PERSONAL_LR = 0.2


def dense(tree):
    got = pure(tree)["dense"]
    return got["kernel"].astype(np.float64), got["bias"].astype(np.float64)


def tree_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def returning_client(cohorts):
    """A client that trained, skipped a round, and trained again."""
    return any(cid in cohorts[r] and cid not in cohorts[r + 1] and any(cid in c for c in cohorts[r + 2:])
               for r in range(len(cohorts) - 2) for cid in cohorts[r])


# ------------------------------------------------------------------------------------- Ditto
def numpy_ditto(pb, w, b, lam, server, personal_steps=None, personal_lr=CLIENT_LR):
    """Algorithm 1 of the paper in float64: FedAvg/FedOpt on (w, b), personal models v_k."""
    lr = 0.8
    if server == "adam":
        init, update = numpy_adam(0.9, 0.99, 1e-3)
        opt = (init(w), init(b))
    personal = {}
    for r, cohort in enumerate(pb.cohorts):
        dws, dbs, ns = [], [], []
        for cid in cohort:
            x, y = pb.xy(cid)
            batches = pb.batches(cid, r)
            cw, cb = local_sgd(w, b, x, y, batches, CLIENT_LR)
            vw, vb = personal.get(cid, (w, b))  # first round: the broadcast model
            for idx in batches[:personal_steps]:
                gw, gb = softmax_grad(vw, vb, x[idx], y[idx])
                vw, vb = vw - personal_lr * (gw + lam * (vw - w)), vb - personal_lr * (gb + lam * (vb - b))
            personal[cid] = (vw, vb)
            dws.append(w - cw), dbs.append(b - cb), ns.append(len(y))
        ns = np.array(ns, float)
        dw, db = np.tensordot(ns, dws, 1) / ns.sum(), np.tensordot(ns, dbs, 1) / ns.sum()
        if server == "adam":
            uw, sw = update(dw, opt[0], lr)
            ub, sb = update(db, opt[1], lr)
            w, b, opt = w + uw, b + ub, (sw, sb)
        else:
            w, b = w - lr * dw, b - lr * db
    return w, b, personal


def server_tx(server):
    return optax.adam(0.8, b1=0.9, b2=0.99, eps=1e-3) if server == "adam" else optax.sgd(0.8)


def check_ditto(pb, w, b, personal):
    pb.check(w, b)
    store = pb.trainer.client_states
    for cid in pb.ids:
        if cid in personal:
            state = store.get(cid)
            assert int(state.rounds) == sum(cid in c for c in pb.cohorts)
            vw, vb = dense(state.params)
            np.testing.assert_allclose(vw, personal[cid][0], atol=1e-5, err_msg=cid)
            np.testing.assert_allclose(vb, personal[cid][1], atol=1e-5, err_msg=cid)
        else:
            assert cid not in store


@pytest.mark.parametrize("server", ["sgd", "adam"])
@pytest.mark.parametrize("regime", list(REGIMES))
def test_ditto_matches_numpy_with_partial_participation(regime, server):
    lam = 0.5
    pb = Problem(num_clients=4, rounds=4, clients_per_round=2, **REGIMES[regime])
    w, b = pb.train(ditto(optax.sgd(CLIENT_LR), lam, server_tx(server)), seed=1)
    assert returning_client(pb.cohorts), pb.cohorts
    w, b, personal = numpy_ditto(pb, w, b, lam, server)
    check_ditto(pb, w, b, personal)


def test_ditto_personal_steps_and_optimizer():
    lam = 1.5
    pb = Problem(num_clients=4, rounds=4, clients_per_round=3, local_epochs=2)
    w0, b0 = pb.train(ditto(optax.sgd(CLIENT_LR), lam, optax.sgd(0.8), personal_tx=optax.sgd(PERSONAL_LR),
                             personal_steps=2), seed=1)
    w, b, personal = numpy_ditto(pb, w0, b0, lam, "sgd", personal_steps=2, personal_lr=PERSONAL_LR)
    check_ditto(pb, w, b, personal)
    logs = pb.trainer.history.history
    assert np.all(np.isfinite(logs["personal_loss"]))


def test_ditto_lam_zero_personal_model_is_local_training_only():
    pb = Problem(num_clients=4, rounds=4, clients_per_round=2, seed=3)
    w, b = pb.train(ditto(optax.sgd(CLIENT_LR), 0.0, optax.sgd(0.8)), seed=1)
    # v_k: plain local SGD on the client's own batches, from the global model of its first round only
    global_models, gw, gb = [], w, b
    for r, cohort in enumerate(pb.cohorts):
        global_models.append((gw, gb))
        ns = np.array([len(pb.xy(c)[1]) for c in cohort], float)
        deltas = []
        for cid in cohort:
            x, y = pb.xy(cid)
            cw, cb = local_sgd(gw, gb, x, y, pb.batches(cid, r), CLIENT_LR)
            deltas.append((gw - cw, gb - cb))
        gw = gw - 0.8 * np.tensordot(ns, [d[0] for d in deltas], 1) / ns.sum()
        gb = gb - 0.8 * np.tensordot(ns, [d[1] for d in deltas], 1) / ns.sum()
    checked = 0
    for cid in pb.ids:
        rounds = [r for r, c in enumerate(pb.cohorts) if cid in c]
        if not rounds:
            continue
        x, y = pb.xy(cid)
        vw, vb = global_models[rounds[0]]
        for r in rounds:
            vw, vb = local_sgd(vw, vb, x, y, pb.batches(cid, r), CLIENT_LR)
        got = dense(pb.trainer.client_states.get(cid).params)
        np.testing.assert_allclose(got[0], vw, atol=1e-5)
        np.testing.assert_allclose(got[1], vb, atol=1e-5)
        checked += len(rounds) > 1
    assert checked, "no client trained twice; the test would not see local training continue"
    pb.check(gw, gb)


def test_ditto_evaluates_each_client_on_its_personal_model():
    pb = Problem(num_clients=4, rounds=2, clients_per_round=2, seed=2)
    pb.train(ditto(optax.sgd(CLIENT_LR), 0.3), seed=1)
    logs = pb.trainer.evaluate(pb.data)
    gw, gb = dense(pb.trainer.params)
    total = count = 0.0
    trained = {c for cohort in pb.cohorts for c in cohort}
    assert trained != set(pb.ids), "every client trained; the test would not see the global fallback"
    for cid in pb.ids:
        x, y = pb.xy(cid)
        w, b = dense(pb.trainer.client_states.get(cid).params) if cid in trained else (gw, gb)
        total += softmax_losses(w, b, x, y).sum()
        count += len(y)
    assert logs["loss"] == pytest.approx(total / count, rel=1e-5)
    assert logs["personalized_clients"] == len(trained)


def test_ditto_checkpoint_resume_is_bit_exact(tmp_path):
    from fedtrain.callbacks import OrbaxCheckpoint

    pb = Problem(num_clients=5, clients_per_round=2)

    def trainer():
        return fedtrain.FederatedTrainer(Linear(rngs=nnx.Rngs(4)), pb.data,
                                         ditto(optax.sgd(CLIENT_LR), 0.5, optax.adam(0.1)), seed=1)

    fit = dict(clients_per_round=2, batch_size=4, verbose=0)
    straight = trainer()
    straight.fit(rounds=5, **fit)
    first = trainer()
    first.fit(rounds=3, **fit, callbacks=[OrbaxCheckpoint(tmp_path)])
    resumed = trainer()
    assert resumed.restore(tmp_path) == 3
    assert tree_equal(resumed.client_states.state_dict(), first.client_states.state_dict())
    resumed.fit(rounds=5, **fit)
    assert tree_equal(resumed.server_state, straight.server_state)
    assert tree_equal(resumed.client_states.state_dict(), straight.client_states.state_dict())
    assert max(int(straight.client_states.get(c).rounds) for c in pb.ids) >= 2


# ------------------------------------------------------------------------------------- q-FFL
def numpy_qffedavg(pb, w, b, q, L):
    """Algorithm 2 (q-FedAvg) of the paper in float64."""
    for r, cohort in enumerate(pb.cohorts):
        sum_dw, sum_db, sum_h = 0.0, 0.0, 0.0
        for cid in cohort:
            x, y = pb.xy(cid)
            F = softmax_losses(w, b, x, y).mean()  # at the broadcast model, over the whole dataset
            cw, cb = local_sgd(w, b, x, y, pb.batches(cid, r), CLIENT_LR)
            dw, db = L * (w - cw), L * (b - cb)
            sum_dw, sum_db = sum_dw + F ** q * dw, sum_db + F ** q * db
            sum_h += q * F ** (q - 1) * ((dw ** 2).sum() + (db ** 2).sum()) + L * F ** q
        w, b = w - sum_dw / sum_h, b - sum_db / sum_h
    return w, b


@pytest.mark.parametrize("q", [0.5, 2.0])
@pytest.mark.parametrize("regime", list(REGIMES))
def test_qffl_matches_numpy_with_partial_participation(regime, q):
    L = 1 / CLIENT_LR
    pb = Problem(num_clients=4, rounds=3, clients_per_round=3, **REGIMES[regime])
    w, b = pb.train(qffl(optax.sgd(CLIENT_LR), q, L))
    w, b = numpy_qffedavg(pb, w, b, q, L)
    pb.check(w, b)


def test_qffl_q0_is_fedavg_with_uniform_client_weights():
    pb = Problem(num_clients=4, rounds=3, clients_per_round=3)
    pb.train(fedavg(optax.sgd(CLIENT_LR), aggregator=mean()))
    reference = dense(pb.trainer.params)
    pb.train(fedavg(optax.sgd(CLIENT_LR)))
    weighted = dense(pb.trainer.params)
    assert np.max(np.abs(weighted[0] - reference[0])) > 1e-3, "sizes equal; the test would not see the weights"
    for L in (1 / CLIENT_LR, 0.7):
        pb.train(qffl(optax.sgd(CLIENT_LR), 0.0, L))
        got = dense(pb.trainer.params)
        np.testing.assert_allclose(got[0], reference[0], atol=1e-5)
        np.testing.assert_allclose(got[1], reference[1], atol=1e-5)


def conflicting_clients(seed=0):
    """Two labelling rules on the same inputs: four clients follow one, one client the other."""
    rng = np.random.default_rng(seed)
    clients = {}
    for i, n in enumerate([30, 40, 50, 35, 45]):
        x = rng.normal(size=(n, 2)).astype(np.float32)
        y = (x[:, 1] > 0) if i == 4 else (x[:, 0] > 0)
        clients[f"c{i}"] = {"x": x, "y": y.astype(np.int32)}
    return clients


def test_raising_q_narrows_the_spread_of_client_losses():
    clients = conflicting_clients()
    data = fedtrain.InMemoryFederatedData(clients)

    def client_losses(q):
        t = fedtrain.FederatedTrainer(Linear(features=2, classes=2, rngs=nnx.Rngs(0)), data,
                                      qffl(optax.sgd(0.5), q, 1 / 0.5), seed=0)
        t.fit(rounds=60, clients_per_round=5, batch_size=10, verbose=0)
        w, b = dense(t.params)
        losses = [softmax_losses(w, b, c["x"].astype(np.float64), c["y"]).mean() for c in clients.values()]
        accuracy = [np.mean(np.argmax(c["x"] @ w + b, -1) == c["y"]) for c in clients.values()]
        return np.array(losses), np.array(accuracy)

    loss0, acc0 = client_losses(0.0)
    loss5, acc5 = client_losses(5.0)
    assert loss0.argmax() == 4, loss0  # the minority client is the worst off under FedAvg
    assert loss5.std() < 0.7 * loss0.std(), (loss0, loss5)
    assert loss5.max() < loss0.max() - 0.05, (loss0, loss5)
    assert acc5.min() > acc0.min(), (acc0, acc5)


# ------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("make,match", [
    (lambda: ditto(optax.sgd(0.1), -0.1), "lam.*>= 0"),
    (lambda: ditto(optax.sgd(0.1), float("nan")), "lam.*>= 0"),
    (lambda: ditto(optax.sgd(0.1), 0.1, personal_steps=0), "personal_steps.*>= 1"),
    (lambda: ditto(optax.sgd(0.1), 0.1, personal_steps=1.5), "personal_steps.*>= 1"),
    (lambda: qffl(optax.sgd(0.1), -1.0, 10.0), "q >= 0"),
    (lambda: qffl(optax.sgd(0.1), 1.0, 0.0), "lipschitz.*> 0"),
    (lambda: qffl(optax.sgd(0.1), 1.0, -10.0), "lipschitz.*> 0"),
])
def test_bad_hyperparameters_fail_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("make", [lambda: ditto(optax.sgd(CLIENT_LR), 0.5, optax.adam(0.1), personal_steps=1),
                                  lambda: qffl(optax.sgd(CLIENT_LR), 1.0, 1 / CLIENT_LR)], ids=["ditto", "qffl"])
def test_backends_agree(make):
    pb = Problem(num_clients=5, rounds=3, clients_per_round=3)
    runs = {}
    for backend, lanes in [("scan", None), ("vmap", 2), ("debug", None)]:
        t = fedtrain.FederatedTrainer(Linear(rngs=nnx.Rngs(4)), pb.data, make(), backend=backend, lanes=lanes, seed=2)
        t.fit(rounds=3, clients_per_round=3, batch_size=4, verbose=0)
        runs[backend] = t
    for backend in ("vmap", "debug"):
        for a, b in zip(jax.tree.leaves(runs["scan"].server_state), jax.tree.leaves(runs[backend].server_state)):
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=backend)
        if runs["scan"].client_states is not None:
            for cid in pb.ids:
                for a, b in zip(jax.tree.leaves(runs["scan"].client_states.get(cid)),
                                jax.tree.leaves(runs[backend].client_states.get(cid))):
                    np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"{backend} {cid}")


@pytest.mark.parametrize("make", [lambda: ditto(optax.sgd(CLIENT_LR), 0.5), lambda: qffl(optax.sgd(CLIENT_LR), 2.0, 3.0)],
                         ids=["ditto", "qffl"])
def test_padded_empty_client_changes_nothing(make):
    from tests.conftest import make_clients, run_engine_round

    clients = make_clients(num_clients=5, max_size=14)
    ids = list(clients)[:4]
    empty = {"x": np.zeros((0, 8), np.float32), "y": np.zeros((0,), np.int32)}
    base = run_engine_round(clients, ids, make(), empty=empty)[1]
    for lanes in (1, 2):
        padded = run_engine_round(clients, ids + ["empty"], make(), lanes=lanes, extra_capacity=5, empty=empty)[1]
        for a, b in zip(jax.tree.leaves(base.server_state), jax.tree.leaves(padded.server_state)):
            np.testing.assert_allclose(a, b, atol=1e-6)
