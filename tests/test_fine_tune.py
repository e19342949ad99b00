"""Fine-tune-then-evaluate: the compiled blocks equal a float64 NumPy loop, in every regime a user can
reach (below an epoch, several epochs, steps without epochs, a stateful optimizer, idle lanes), and do
not depend on which other clients are evaluated; bad input is refused with the fix."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import fedtrain
from fedtrain.engine.plan import BatchSpec
from fedtrain.personalization import fine_tune_evaluate, fine_tune_order
from tests.conftest import Linear, make_clients

ROOT = __file__.rsplit('/tests/', 1)[0]


def linear_model(features=8, seed=0):
    return fedtrain.models.adapter.from_nnx(Linear(features=features, rngs=nnx.Rngs(seed)))


def weights(model):
    leaves = jax.tree.leaves(model.init_params)
    W = next(np.asarray(x, np.float64) for x in leaves if np.ndim(x) == 2)
    b = next(np.asarray(x, np.float64) for x in leaves if np.ndim(x) == 1)
    return W, b


def softmax_sums(W, b, x, y):
    logits = x.astype(np.float64) @ W + b
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return {"loss": (float(-logp[np.arange(len(y)), y].sum()), float(len(y))),
            "accuracy": (float((logits.argmax(-1) == y).sum()), float(len(y)))}


def reference(W, b, train, test, train_ids, spec, seed, lr, momentum):
    """Per client: SGD (heavy ball when ``momentum``) on the mean softmax cross-entropy of each batch's real
    examples, visiting ``fine_tune_order``; totals before and after on its test examples."""
    before, after = {}, {}
    for cid in test:
        ex = train[cid]
        order = fine_tune_order(len(ex["y"]), spec, seed, train_ids.index(cid))
        w, c = W.copy(), b.copy()
        vw, vc = np.zeros_like(w), np.zeros_like(c)
        for batch in order.reshape(-1, spec.batch_size):
            idx = batch[batch >= 0]
            x, y = ex["x"][idx].astype(np.float64), ex["y"][idx]
            z = x @ w + c
            p = np.exp(z - z.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            p[np.arange(len(y)), y] -= 1.0
            gw, gc = x.T @ p / len(y), p.sum(0) / len(y)
            vw, vc = momentum * vw + gw, momentum * vc + gc
            w, c = w - lr * vw, c - lr * vc
        before[cid] = softmax_sums(W, b, test[cid]["x"], test[cid]["y"])
        after[cid] = softmax_sums(w, c, test[cid]["x"], test[cid]["y"])
    return before, after


def assert_totals_close(got, want):
    assert set(got) == set(want)
    for cid in want:
        for m, (s, n) in want[cid].items():
            assert got[cid][m][1] == n, (cid, m)
            np.testing.assert_allclose(got[cid][m][0], s, rtol=2e-5, atol=2e-5, err_msg=f"{cid} {m}")


REGIMES = {
    "below_an_epoch": dict(batch_size=4, local_epochs=1, local_steps=2),
    "three_epochs": dict(batch_size=5, local_epochs=3, local_steps=None),
    "steps_without_epochs": dict(batch_size=8, local_epochs=None, local_steps=7),
}


@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("momentum,lanes", [(0.0, 4), (0.9, 3)], ids=["sgd-4lanes", "momentum-3lanes"])
def test_equals_a_numpy_loop(regime, momentum, lanes):
    """7 clients in lanes of 3 or 4: the last block has idle lanes; sizes 3..40 give blocks of different
    step capacities."""
    kw = REGIMES[regime]
    train = make_clients(7, seed=1)
    test = {c: v for c, v in make_clients(7, seed=2).items()}
    model = linear_model()
    tx = optax.sgd(0.3, momentum=momentum or None)
    got = fine_tune_evaluate(model, model.init_params, fedtrain.InMemoryFederatedData(train),
                             fedtrain.InMemoryFederatedData(test), client_optimizer=tx, seed=5, lanes=lanes,
                             eval_batch_size=16, **kw)
    spec = BatchSpec(kw["batch_size"], kw["local_epochs"], kw["local_steps"])
    before, after = reference(*weights(model), train, test, list(train), spec, 5, 0.3, momentum)
    assert_totals_close(got.before, before)
    assert_totals_close(got.after, after)
    assert got.steps == {c: int(spec.steps(len(train[c]["y"]))) for c in test}
    acc = lambda t: sum(v["accuracy"][0] for v in t.values()) / sum(v["accuracy"][1] for v in t.values())  # noqa
    assert got.summary_after["accuracy"] == pytest.approx(acc(after), abs=1e-9)
    gain = np.mean([after[c]["loss"][0] / after[c]["loss"][1] - before[c]["loss"][0] / before[c]["loss"][1]
                    for c in test])
    assert got.improvement["loss_client_mean"] == pytest.approx(gain, rel=1e-4, abs=1e-6)


def test_a_client_gets_the_same_result_whatever_else_is_evaluated_and_the_lanes():
    train = fedtrain.InMemoryFederatedData(make_clients(10, seed=3))
    test = fedtrain.InMemoryFederatedData(make_clients(10, seed=4))
    model = linear_model()
    kw = dict(client_optimizer=optax.adam(0.05), batch_size=4, local_epochs=2, seed=1)
    full = fine_tune_evaluate(model, model.init_params, train, test, lanes=8, **kw)
    some = ["client_007", "client_002", "client_005"]
    part = fine_tune_evaluate(model, model.init_params, train, test, lanes=2, client_ids=some, **kw)
    for cid in some:
        for m in ("loss", "accuracy"):
            np.testing.assert_allclose(part.after[cid][m], full.after[cid][m], rtol=1e-5)
    again = fine_tune_evaluate(model, model.init_params, train, test, lanes=8, **kw)
    assert again.after == full.after
    other = fine_tune_evaluate(model, model.init_params, train, test, lanes=8, **{**kw, "seed": 2})
    assert other.after != full.after  # the seed picks the order of the examples


def test_fine_tuning_helps_clients_whose_labels_the_global_model_gets_wrong():
    """Each client permutes the classes its own way: the shared model cannot fit them all, a few local
    steps from it do."""
    rng = np.random.default_rng(0)
    base = make_clients(12, seed=6, min_size=30, max_size=60)
    train, test = {}, {}
    for cid, ex in base.items():
        perm = rng.permutation(3)
        y = perm[ex["y"]].astype(np.int32)
        half = len(y) // 2
        train[cid] = {"x": ex["x"][:half], "y": y[:half]}
        test[cid] = {"x": ex["x"][half:], "y": y[half:]}
    trainer = fedtrain.FederatedTrainer(Linear(features=8, rngs=nnx.Rngs(0)), train,
                                        fedtrain.algorithms.fedavg(optax.sgd(0.2)))
    trainer.fit(rounds=5, clients_per_round=6, batch_size=8, verbose=0)
    params = jax.tree.map(np.asarray, trainer.params)
    result = trainer.fine_tune_evaluate(test, client_optimizer=optax.sgd(0.5), batch_size=8, local_epochs=10)
    assert result.summary_after["accuracy_client_mean"] > result.summary_before["accuracy_client_mean"] + 0.2
    assert result.improvement["accuracy_improved"] >= 0.75
    assert result.summary_before["accuracy"] == pytest.approx(trainer.evaluate(test)["accuracy"], abs=1e-6)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, trainer.params), params)  # unchanged
    assert set(result.logs) >= {"ft_before_accuracy", "ft_after_accuracy_p10", "ft_gain_accuracy_improved"}


def test_compiles_grow_with_the_largest_client_not_the_population():
    model = linear_model()
    kw = dict(client_optimizer=optax.sgd(0.1), batch_size=4, local_epochs=1, lanes=4, eval_batch_size=8)
    small = make_clients(8, seed=7, min_size=3, max_size=60)
    large = make_clients(64, seed=8, min_size=3, max_size=60)
    r1 = fine_tune_evaluate(model, model.init_params, fedtrain.InMemoryFederatedData(small),
                            fedtrain.InMemoryFederatedData(small), **kw)
    r2 = fine_tune_evaluate(model, model.init_params, fedtrain.InMemoryFederatedData(large),
                            fedtrain.InMemoryFederatedData(large), **kw)
    # steps 1..15 -> capacities 1,2,4,8,16; eval batches 1..8 -> 1,2,4,8: blocks pair them monotonically
    assert r2.compiles <= 8 and r1.compiles <= r2.compiles
    assert len(r2.after) == 64
    again = fine_tune_evaluate(model, model.init_params, fedtrain.InMemoryFederatedData(large),
                               fedtrain.InMemoryFederatedData(large), **kw)
    assert again.compiles == 0 and again.after == r2.after  # same model and optimizer: nothing recompiles


def test_benchmark_writes_json_and_a_table(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "ft.json"
    proc = subprocess.run([sys.executable, "benchmarks/fine_tune_eval.py", "--clients", "12", "--mean-size", "10",
                           "--repeats", "1", "--output", str(out)], capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["fine_tuned_clients"] == 12 and result["ratio_to_round"] > 0
    assert "fine_tune" in proc.stdout and "vs round" in proc.stdout


def test_bad_input_names_the_problem_and_the_fix():
    model = linear_model()
    clients = make_clients(4, seed=9)
    train = fedtrain.InMemoryFederatedData({c: v for c, v in list(clients.items())[:3]})
    test = fedtrain.InMemoryFederatedData(clients)
    kw = dict(client_optimizer=optax.sgd(0.1), batch_size=4)
    with pytest.raises(ValueError, match=r"1 of 4 test clients have no training examples.*client_003.*missing='skip'"):
        fine_tune_evaluate(model, model.init_params, train, test, **kw)
    skipped = fine_tune_evaluate(model, model.init_params, train, test, missing="skip", **kw)
    assert skipped.skipped == ["client_003"] and set(skipped.after) == {"client_000", "client_001", "client_002"}
    with pytest.raises(ValueError, match=r"not clients of the test data.*nobody"):
        fine_tune_evaluate(model, model.init_params, train, test, client_ids=["nobody"], **kw)
    with pytest.raises(ValueError, match="missing must be 'error' or 'skip'"):
        fine_tune_evaluate(model, model.init_params, train, test, missing="drop", **kw)
    with pytest.raises(TypeError, match=r"client_optimizer must be an optax.GradientTransformation"):
        fine_tune_evaluate(model, model.init_params, train, test, client_optimizer=0.1, batch_size=4)
    with pytest.raises(ValueError, match="local_epochs must be >= 1"):
        fine_tune_evaluate(model, model.init_params, train, test, local_epochs=0, **kw)
    with pytest.raises(ValueError, match="no client to evaluate"):
        fine_tune_evaluate(model, model.init_params, train, fedtrain.InMemoryFederatedData({}), **kw)
    wrong = {c: dict(v) for c, v in clients.items()}
    wrong["client_001"]["x"] = wrong["client_001"]["x"][:, :5]
    with pytest.raises(ValueError, match=r"the test data: client 'client_001': feature 'x' has shape"):
        fine_tune_evaluate(model, model.init_params, train, fedtrain.InMemoryFederatedData(wrong), missing="skip",
                           **kw)


def test_trainer_method_takes_a_dict_and_defaults_to_its_training_data_and_seed():
    clients = make_clients(6, seed=10)
    trainer = fedtrain.FederatedTrainer(Linear(features=8, rngs=nnx.Rngs(0)), clients,
                                        fedtrain.algorithms.fedavg(optax.sgd(0.1)), seed=3)
    got = trainer.fine_tune_evaluate(clients, client_optimizer=optax.sgd(0.3), batch_size=4, local_steps=3)
    spec = BatchSpec(4, 1, 3)
    W, b = weights(trainer.model_fns)
    before, after = reference(W, b, clients, clients, list(clients), spec, 3, 0.3, 0.0)
    assert_totals_close(got.after, after)
