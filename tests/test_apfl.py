"""APFL: a float64 NumPy replay of FedJAX's update, regimes, resume, the personal model, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import fedtrain
from fedtrain.algorithms.apfl import APFLClientState, APFLState, apfl
from fedtrain.algorithms import fedopt
from tests.conftest import Linear, straight_and_resumed
from tests.test_algorithms import (CLIENT_LR, REGIMES, Problem, numpy_adam, numpy_momentum, pure, softmax_grad,
                                   softmax_losses)


def replay(pb, w, b, *, alpha=0.25, client_beta=0.0, server="sgd", server_lr=0.9, alpha_lr=None, adaptive=True):
    """FedJAX's APFL on the trainer's cohorts and batches, in float64. Returns (w, b, states, clipped)."""
    c_init, c_update = numpy_momentum(client_beta)
    s_init, s_update = numpy_adam() if server == "adam" else numpy_momentum(0.0)
    a_init, a_update = (numpy_momentum(0.0) if alpha_lr is not None else (c_init, c_update))
    a_rate = CLIENT_LR if alpha_lr is None else alpha_lr
    s_opt = (s_init(w), s_init(b))
    states, clipped = {}, [False]
    for r, cohort in enumerate(pb.cohorts):
        dw, db, ns = [], [], []
        for cid in cohort:
            x, y = pb.xy(cid)
            v, a = states.get(cid, ((w, b), (alpha, alpha)))  # FedJAX: v starts at the server model
            p = [w, b]
            v, a = list(v), list(a)
            opt_p, opt_v, opt_a = [c_init(t) for t in p], [c_init(t) for t in v], [a_init(np.float64(t)) for t in a]
            for idx in pb.batches(cid, r):
                mix = [a[i] * v[i] + (1 - a[i]) * p[i] for i in range(2)]
                gp = softmax_grad(p[0], p[1], x[idx], y[idx])
                gv = softmax_grad(mix[0], mix[1], x[idx], y[idx])
                ga = [np.sum((v[i] - p[i]) * gv[i]) for i in range(2)]
                for i in range(2):
                    u, opt_p[i] = c_update(gp[i], opt_p[i], CLIENT_LR)
                    uv, opt_v[i] = c_update(gv[i], opt_v[i], CLIENT_LR)
                    if adaptive:
                        ua, opt_a[i] = a_update(ga[i], opt_a[i], a_rate)
                        raw = a[i] + ua
                        clipped[0] |= not 0 <= raw <= 1
                        a[i] = float(np.clip(raw, 0, 1))
                    p[i], v[i] = p[i] + u, v[i] + uv
            states[cid] = ((v[0], v[1]), (a[0], a[1]))
            dw.append(w - p[0]), db.append(b - p[1]), ns.append(len(y))
        ns = np.array(ns, float)
        mw, mb = np.tensordot(ns, dw, 1) / ns.sum(), np.tensordot(ns, db, 1) / ns.sum()
        uw, sw = s_update(mw, s_opt[0], server_lr)
        ub, sb = s_update(mb, s_opt[1], server_lr)
        w, b, s_opt = w + uw, b + ub, (sw, sb)
    return w, b, states, clipped[0]


def check_states(pb, states, atol=1e-5):
    store = pb.trainer.client_states
    assert sorted(c for c in pb.ids if c in store) == sorted(states)
    for cid, ((vw, vb), (aw, ab)) in states.items():
        got = store.get(cid)
        v, a = pure(got.params)["dense"], pure(got.alpha)["dense"]
        np.testing.assert_allclose(v["kernel"], vw, atol=atol, err_msg=cid)
        np.testing.assert_allclose(v["bias"], vb, atol=atol, err_msg=cid)
        np.testing.assert_allclose([a["kernel"], a["bias"]], [aw, ab], atol=atol, err_msg=cid)
        assert float(got.started) == 1.0


def participation(pb):
    """(a client skipped a round and came back, a client joined after round 1)."""
    seen = [set(c) for c in pb.cohorts]
    back = any(cid in seen[r] and cid not in seen[r + 1] and any(cid in s for s in seen[r + 2:])
               for r in range(len(seen)) for cid in pb.ids)
    late = any(cid not in seen[0] and any(cid in s for s in seen[1:]) for cid in pb.ids)
    return back, late


VARIANTS = {
    "sgd": dict(),
    "momentum_adam": dict(client_beta=0.5, server="adam", server_lr=0.05),
    "alpha_lr_clipped": dict(alpha=0.9, alpha_lr=8.0),
    "fixed_alpha": dict(alpha=0.6, adaptive=False),
}


def build(variant):
    kw = VARIANTS[variant]
    client_tx = optax.sgd(CLIENT_LR, momentum=kw["client_beta"]) if kw.get("client_beta") else optax.sgd(CLIENT_LR)
    if kw.get("server") == "adam":
        return apfl(client_tx, optax.adam(kw["server_lr"], b1=0.9, b2=0.99, eps=1e-3))
    return apfl(client_tx, alpha=kw.get("alpha", 0.25), adaptive_alpha=kw.get("adaptive", True),
                alpha_learning_rate=kw.get("alpha_lr"), server_learning_rate=kw.get("server_lr", 0.9))


@pytest.mark.parametrize("variant,regime,backend", [
    ("sgd", "one_epoch", "scan"), ("sgd", "one_step", "scan"), ("sgd", "three_epochs", "scan"),
    ("momentum_adam", "one_epoch", "scan"), ("momentum_adam", "three_epochs", "vmap"),
    ("alpha_lr_clipped", "three_epochs", "scan"), ("fixed_alpha", "three_epochs", "scan")])
def test_apfl_matches_numpy_with_partial_participation(variant, regime, backend):
    pb = Problem(num_clients=4, rounds=4, clients_per_round=2, seed=2, **REGIMES[regime])
    w, b = pb.train(build(variant), seed=5, backend=backend)
    assert participation(pb) == (True, True), pb.cohorts  # the test sees kept and fresh client states
    w, b, states, clipped = replay(pb, w, b, **VARIANTS[variant])
    pb.check(w, b)
    check_states(pb, states)
    if variant == "alpha_lr_clipped":
        assert clipped, "alpha never left [0, 1]; the test would not see the clipping"
    alphas = [a for _, a in states.values()]
    if VARIANTS[variant].get("adaptive", True):
        assert any(abs(x - VARIANTS[variant].get("alpha", 0.25)) > 1e-3 for a in alphas for x in a), alphas
    else:
        assert all(x == VARIANTS[variant].get("alpha", 0.25) for a in alphas for x in a)


def test_global_model_is_fedavgs():
    """The global copy never reads v or alpha, so the server model is FedOpt's with the same optimizers
    (FedJAX's APFL too); the personal models differ from it."""
    pb = Problem(num_clients=4, rounds=3, clients_per_round=2, seed=2, local_epochs=2)
    pb.train(apfl(optax.sgd(CLIENT_LR, momentum=0.5), optax.adam(0.05)), seed=5)
    apfl_trainer = pb.trainer
    pb.train(fedopt(optax.sgd(CLIENT_LR, momentum=0.5), optax.adam(0.05)), seed=5)
    for x, y in zip(jax.tree.leaves(apfl_trainer.params), jax.tree.leaves(pb.trainer.params)):
        np.testing.assert_allclose(x, y, atol=1e-6)
    mixed = [apfl_trainer.algorithm.personal_params(apfl_trainer.server_state, apfl_trainer.client_states.get(c))
             for c in pb.ids if c in apfl_trainer.client_states]
    assert max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for m in mixed for a, b in zip(jax.tree.leaves(m), jax.tree.leaves(apfl_trainer.params))) > 1e-3


def tree_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def test_checkpoint_resume_is_bit_exact_with_client_states(tmp_path):
    pb = Problem(num_clients=5, seed=2)
    fit = dict(clients_per_round=2, batch_size=4, verbose=0)

    def trainer():
        return fedtrain.FederatedTrainer(Linear(rngs=nnx.Rngs(4)), pb.data,
                                         apfl(optax.sgd(CLIENT_LR, momentum=0.5), optax.adam(0.05)), seed=3)

    straight, first, resumed = straight_and_resumed(trainer, tmp_path, **fit)
    assert tree_equal(resumed.server_state, straight.server_state)
    assert resumed.client_states.state_dict().keys() == straight.client_states.state_dict().keys()
    assert tree_equal(resumed.client_states.state_dict(), straight.client_states.state_dict())
    assert not tree_equal(resumed.server_state, first.server_state)  # rounds 4-5 did run


def test_personal_params_is_the_mixture():
    rng = np.random.default_rng(0)
    server = {"k": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=(2,)).astype(np.float32)}
    personal = {"k": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=(2,)).astype(np.float32)}
    alg = apfl(optax.sgd(0.1), alpha=0.3)
    state = APFLState(server, ())
    cs = APFLClientState(personal, {"k": np.float32(0.2), "b": np.float32(0.9)}, np.float32(1))
    got = alg.personal_params(state, cs)
    np.testing.assert_allclose(got["k"], 0.2 * personal["k"] + 0.8 * server["k"], rtol=1e-6)
    np.testing.assert_allclose(got["b"], 0.9 * personal["b"] + 0.1 * server["b"], rtol=1e-6)
    # the initial state (before a client's first round) is the server model, as FedJAX evaluates it
    fresh = alg.personal_params(state, alg.client_state_init(personal))
    for k in server:
        np.testing.assert_array_equal(fresh[k], server[k])
    # vmapped over clients, as the evaluator calls it
    stacked = jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), cs, alg.client_state_init(personal))
    both = jax.jit(jax.vmap(alg.personal_params, in_axes=(None, 0)))(state, stacked)
    np.testing.assert_allclose(both["k"][0], got["k"], rtol=1e-6)
    np.testing.assert_allclose(both["k"][1], server["k"], rtol=1e-6)


def test_evaluate_uses_each_clients_mixture():
    pb = Problem(num_clients=4, rounds=2, clients_per_round=2, seed=2, local_epochs=2)
    pb.train(apfl(optax.sgd(CLIENT_LR)), seed=5)
    t = pb.trainer
    total, count = 0.0, 0
    for cid in pb.ids:
        p = (t.algorithm.personal_params(t.server_state, t.client_states.get(cid)) if cid in t.client_states
             else t.params)
        d = pure(p)["dense"]
        x, y = pb.xy(cid)
        total += softmax_losses(d["kernel"].astype(np.float64), d["bias"].astype(np.float64), x, y).sum()
        count += len(y)
    logs = t.evaluate(pb.data, verbose=0)
    np.testing.assert_allclose(logs["loss"], total / count, rtol=1e-5)
    assert 0 < logs["personalized_clients"] < 4


def test_training_logs_the_personal_models_loss():
    pb = Problem(num_clients=4, rounds=3, clients_per_round=2, seed=2, local_epochs=2)
    pb.train(apfl(optax.sgd(CLIENT_LR)), seed=5)
    h = pb.trainer.history.history
    assert len(h["personal_loss"]) == 3 and np.all(np.isfinite(h["personal_loss"]))
    assert h["personal_loss"][-1] != h["loss"][-1]


@pytest.mark.parametrize("kw,match", [
    (dict(alpha=-0.1), r"alpha .*\[0, 1\], got -0.1"),
    (dict(alpha=1.5), r"alpha .*\[0, 1\], got 1.5"),
    (dict(alpha=float("nan")), r"alpha .*\[0, 1\]"),
    (dict(alpha_learning_rate=-0.5), r"alpha_learning_rate must be a finite number >= 0, got -0.5"),
    (dict(server_learning_rate=-1.0), r"server_learning_rate must be a finite number >= 0, got -1.0"),
    (dict(server_learning_rate=float("inf")), r"server_learning_rate must be a finite number >= 0"),
    (dict(adaptive_alpha=False, alpha_learning_rate=0.1), r"adaptive_alpha=False.*leave alpha_learning_rate unset"),
    (dict(server_tx=optax.sgd(1.0), server_learning_rate=0.5), r"server_tx or server_learning_rate"),
])
def test_bad_hyperparameters_name_the_fix(kw, match):
    with pytest.raises(ValueError, match=match):
        apfl(optax.sgd(0.1), **kw)


def test_wrong_optimizer_types_are_type_errors():
    with pytest.raises(TypeError, match=r"client_tx must be an optax transformation"):
        apfl(0.1)
    with pytest.raises(TypeError, match=r"server_tx must be an optax transformation"):
        apfl(optax.sgd(0.1), 1.0)
    with pytest.raises(TypeError, match=r"alpha must be a number"):
        apfl(optax.sgd(0.1), alpha="high")
