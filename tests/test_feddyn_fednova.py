"""FedDyn and FedNova: float64 NumPy references of their update rules (scan, and vmap with 2 lanes),
and behaviour where the papers say what happens."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import fedtrain
from fedtrain.algorithms import fedavg, feddyn, fednova
from tests.conftest import Linear, make_clients, run_engine_round
from tests.test_algorithms import CLIENT_LR, Problem, local_sgd, pure, softmax_grad

def rerun(pb, algorithm, backend, lanes):
    """Trains like ``pb.train`` (same model, data, seed and cohorts) on another backend."""
    t = fedtrain.FederatedTrainer(Linear(rngs=nnx.Rngs(4)), pb.data, algorithm, backend=backend, seed=pb.seed,
                                  lanes=lanes)
    t.fit(rounds=pb.rounds, clients_per_round=pb.k, batch_size=pb.spec.batch_size, local_epochs=pb.spec.local_epochs,
          local_steps=pb.spec.local_steps, verbose=0)
    return t


def trainers(pb, make_algorithm):
    """``(w0, b0)`` and the trainers of scan and vmap (2 lanes); ``pb.cohorts`` come from the scan run."""
    w, b = pb.train(make_algorithm())
    return (w, b), {"scan": pb.trainer, "vmap": rerun(pb, make_algorithm(), "vmap", 2)}


def assert_dense(tree, w, b, what="", atol=1e-5):
    got = pure(tree)["dense"]
    np.testing.assert_allclose(got["kernel"], w, atol=atol, err_msg=what)
    np.testing.assert_allclose(got["bias"], b, atol=atol, err_msg=what)


def max_param_diff(t1, t2):
    a, b = pure(t1.params)["dense"], pure(t2.params)["dense"]
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


# ------------------------------------------------------------------------------------- FedDyn
@pytest.mark.parametrize("local_epochs", [1, 2])
def test_feddyn_matches_numpy_with_partial_participation(local_epochs):
    alpha, N = 0.5, 5
    pb = Problem(num_clients=N, rounds=4, clients_per_round=2, local_epochs=local_epochs)
    (w, b), runs = trainers(pb, lambda: feddyn(optax.sgd(CLIENT_LR), alpha))
    h = (np.zeros_like(w), np.zeros_like(b))
    g = {cid: (np.zeros_like(w), np.zeros_like(b)) for cid in pb.ids}
    for r, cohort in enumerate(pb.cohorts):
        thetas = []
        for cid in cohort:
            x, y = pb.xy(cid)
            gi = g[cid]

            def grad(cw, cb, i):  # ∇ of L_i(θ) - <g_i, θ> + α/2 ||θ - θ_server||²
                gw, gb = softmax_grad(cw, cb, x[i], y[i])
                return gw - gi[0] + alpha * (cw - w), gb - gi[1] + alpha * (cb - b)
            cw, cb = local_sgd(w, b, x, y, pb.batches(cid, r), CLIENT_LR, grad)
            g[cid] = (gi[0] - alpha * (cw - w), gi[1] - alpha * (cb - b))
            thetas.append((cw, cb))
        h = (h[0] - alpha / N * sum(t[0] - w for t in thetas), h[1] - alpha / N * sum(t[1] - b for t in thetas))
        w = np.mean([t[0] for t in thetas], 0) - h[0] / alpha
        b = np.mean([t[1] for t in thetas], 0) - h[1] / alpha
    assert any(sum(cid in c for c in pb.cohorts) >= 2 for cid in pb.ids), "g_i should carry over to a later round"
    for backend, t in runs.items():
        assert_dense(t.params, w, b, backend)
        assert_dense(t.server_state.h, *h, backend)
        for cid in pb.ids:  # clients never sampled keep g_i = 0
            assert_dense(t.client_states.get(cid), *g[cid], f"{backend} {cid}")


def test_feddyn_is_not_fedavg():
    pb = Problem(num_clients=4, rounds=1)
    pb.train(fedavg(optax.sgd(CLIENT_LR)))
    avg = pb.trainer
    pb.train(feddyn(optax.sgd(CLIENT_LR), alpha=0.5))
    assert max_param_diff(avg, pb.trainer) > 1e-3


def test_feddyn_validates_alpha():
    for alpha in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="alpha > 0"):
            feddyn(optax.sgd(0.1), alpha)


# ------------------------------------------------------------------------------------- FedNova
@pytest.mark.parametrize("rho", [0.0, 0.9], ids=["sgd", "momentum"])
@pytest.mark.parametrize("local_epochs", [1, 2])
def test_fednova_matches_numpy_with_heterogeneous_steps(rho, local_epochs):
    server_lr = 0.8
    pb = Problem(num_clients=5, rounds=3, clients_per_round=3, local_epochs=local_epochs)
    (w, b), runs = trainers(pb, lambda: fednova(CLIENT_LR, server_lr, momentum=rho))
    step_counts = set()
    for r, cohort in enumerate(pb.cohorts):
        ds, ns, norms = [], [], []
        for cid in cohort:
            x, y = pb.xy(cid)
            cw, cb, vw, vb = w, b, 0.0, 0.0
            batches = pb.batches(cid, r)
            for i in batches:  # heavy-ball SGD: v <- ρ v + g, θ <- θ - η v
                gw, gb = softmax_grad(cw, cb, x[i], y[i])
                vw, vb = rho * vw + gw, rho * vb + gb
                cw, cb = cw - CLIENT_LR * vw, cb - CLIENT_LR * vb
            tau = len(batches)
            a = sum((1 - rho ** k) / (1 - rho) for k in range(1, tau + 1))  # ||a_i||_1
            ds.append(((w - cw) / a, (b - cb) / a)), ns.append(len(y)), norms.append(a)
            step_counts.add(tau)
        p = np.array(ns, float) / sum(ns)
        tau_eff = float(p @ np.array(norms))
        w = w - server_lr * tau_eff * sum(pi * d[0] for pi, d in zip(p, ds))
        b = b - server_lr * tau_eff * sum(pi * d[1] for pi, d in zip(p, ds))
    assert len(step_counts) > 1, "clients should take different numbers of local steps"
    for backend, t in runs.items():
        assert_dense(t.params, w, b, backend)
    np.testing.assert_allclose(pb.trainer.history.history["tau_eff"][-1], tau_eff, rtol=1e-5)


@pytest.mark.parametrize("rho", [0.0, 0.9], ids=["sgd", "momentum"])
def test_fednova_equals_fedavg_iff_step_counts_are_equal(rho):
    """Equal ``τ_i``: equal ``a_i``, so ``τ_eff Σ p_i d_i`` is FedAvg's weighted mean delta."""
    for local_steps, same in ((2, True), (None, False)):  # 2 steps each; one epoch of 2-3 batches
        pb = Problem(num_clients=4, rounds=2, local_steps=local_steps)
        pb.train(fedavg(optax.sgd(CLIENT_LR, momentum=rho or None), server_learning_rate=0.8))
        avg = pb.trainer
        pb.train(fednova(CLIENT_LR, 0.8, momentum=rho))
        assert (max_param_diff(avg, pb.trainer) < 1e-6) == same, local_steps


def test_fednova_client_rate_is_injected():
    pb = Problem(num_clients=3, rounds=1)
    t = fedtrain.FederatedTrainer(Linear(rngs=nnx.Rngs(4)), pb.data, fednova(0.3), seed=7)
    assert t.get_hyperparam("learning_rate", target="client") == pytest.approx(0.3)


def test_fednova_validates_momentum():
    with pytest.raises(ValueError, match="momentum < 1"):
        fednova(0.1, momentum=1.0)


# ------------------------------------------------------------------------------------- contract
ALGORITHMS = {"feddyn": lambda: feddyn(optax.sgd(0.1, momentum=0.9), alpha=0.3),
              "fednova": lambda: fednova(0.1, 0.9, momentum=0.5)}


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_debug_backend_agrees_and_state_round_trips(name):
    pb = Problem(num_clients=4, rounds=2, clients_per_round=2)
    pb.train(ALGORITHMS[name]())
    debug = rerun(pb, ALGORITHMS[name](), "debug", None)
    assert max_param_diff(pb.trainer, debug) < 1e-5
    resumed = fedtrain.FederatedTrainer(Linear(rngs=nnx.Rngs(4)), pb.data, ALGORITHMS[name](), seed=pb.seed)
    resumed.load_state_dict(jax.tree.map(np.array, pb.trainer.state_dict()))
    for t in (pb.trainer, resumed):  # a third round from the restored server and client states
        t.fit(rounds=3, clients_per_round=pb.k, batch_size=pb.spec.batch_size, verbose=0)
    assert resumed.round == 3 and max_param_diff(pb.trainer, resumed) < 1e-6


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_padded_empty_client_changes_nothing(name):
    clients = make_clients(num_clients=5, max_size=14)
    ids = list(clients)[:4]
    empty = {"x": np.zeros((0, 8), np.float32), "y": np.zeros((0,), np.int32)}
    base = run_engine_round(clients, ids, ALGORITHMS[name]())[1]
    for lanes in (1, 2):
        padded = run_engine_round(clients, ids + ["empty"], ALGORITHMS[name](), lanes=lanes, extra_capacity=5,
                                  empty=empty)[1]
        diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                   for a, b in zip(jax.tree.leaves(base.server_state), jax.tree.leaves(padded.server_state)))
        assert diff < 1e-6, lanes
