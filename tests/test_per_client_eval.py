"""Per-client evaluation: totals against a float64 NumPy loop, personal models, logs, TensorBoard, plots."""

import csv
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import fedtrain
from fedtrain.callbacks import CSVLogger, TensorBoard
from fedtrain.evaluation import Evaluator, summarize_clients
from fedtrain.logs.events import read_histograms, read_scalars
from tests.conftest import Linear, make_clients


def linear_weights(params):
    """``(kernel, bias)`` of the ``Linear`` model as float64 arrays."""
    flat = {jax.tree_util.keystr(p): np.asarray(v, np.float64) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    kernel = next(v for k, v in flat.items() if "kernel" in k)
    bias = next(v for k, v in flat.items() if "bias" in k)
    return kernel, bias


def numpy_client(params, examples):
    """``{loss: (sum, count), accuracy: (sum, count)}`` of one client, float64, one example at a time."""
    kernel, bias = linear_weights(params)
    loss = correct = 0.0
    for x, y in zip(examples["x"].astype(np.float64), examples["y"]):
        logits = x @ kernel + bias
        top = logits.max()
        loss += -(logits[y] - top - np.log(np.exp(logits - top).sum()))
        correct += float(np.argmax(logits) == y)
    n = float(len(examples["y"]))
    return {"loss": (loss, n), "accuracy": (correct, n)}


def linear_trainer(data, algorithm=None):
    algorithm = algorithm or fedtrain.algorithms.fedavg(optax.sgd(0.5))
    return fedtrain.FederatedTrainer(Linear(features=8, rngs=nnx.Rngs(0)), data, algorithm)


def personal_toy():
    """FedAvg whose client state is the client's own last update; its personal model is the global one plus
    that update (a locally fine-tuned model)."""
    base = fedtrain.algorithms.fedavg(optax.sgd(0.5))

    def client_final(params, local, ctx):
        out = base.client_final(params, local, ctx)
        return out._replace(client_state=jax.tree.map(jnp.negative, out.update))

    return base._replace(name="personal_toy", client_final=client_final,
                         client_state_init=lambda p: jax.tree.map(jnp.zeros_like, p),
                         personal_params=lambda s, c: jax.tree.map(jnp.add, s.params, c))


@pytest.fixture
def clients():
    return make_clients(num_clients=13, min_size=1, max_size=30, seed=3)


@pytest.fixture
def data(clients):
    return fedtrain.InMemoryFederatedData(clients)


def assert_totals_close(got, want):
    assert sorted(got) == sorted(want)
    for cid in want:
        for m, (s, c) in want[cid].items():
            assert got[cid][m][1] == pytest.approx(c), (cid, m)
            assert got[cid][m][0] == pytest.approx(s, rel=1e-5, abs=1e-5), (cid, m)


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_client_totals_match_a_float64_numpy_loop(clients, data, batch_size):
    trainer = linear_trainer(data)
    trainer.fit(rounds=1, clients_per_round=4, batch_size=5, verbose=0)  # non-trivial weights
    got = trainer._evaluator.client_totals(trainer.params, data, batch_size=batch_size)
    want = {cid: numpy_client(trainer.params, ex) for cid, ex in clients.items()}
    assert_totals_close(got, want)


def test_pooled_values_equal_plain_evaluate_and_client_metrics_hold_each_client(clients, data):
    trainer = linear_trainer(data)
    trainer.fit(rounds=2, clients_per_round=4, batch_size=5, verbose=0)
    plain = trainer.evaluate(data, batch_size=8)
    assert trainer.client_metrics is None  # plain evaluate computes no per-client results
    logs = trainer.evaluate(data, batch_size=8, per_client=True)
    assert all(isinstance(v, float) for v in logs.values())
    for m in ("loss", "accuracy"):
        assert logs[m] == pytest.approx(plain[m], rel=1e-6)
    want = {cid: numpy_client(trainer.params, ex) for cid, ex in clients.items()}
    assert logs == pytest.approx(summarize_clients(want), rel=1e-5)
    assert logs["num_clients"] == len(clients)
    assert sorted(trainer.client_metrics) == sorted(clients)
    for cid, row in trainer.client_metrics.items():
        assert row["num_examples"] == len(clients[cid]["y"]) and row["personalized"] is False
        assert row["loss"] == pytest.approx(want[cid]["loss"][0] / want[cid]["loss"][1], rel=1e-5)
    client_mean = np.mean([r["accuracy"] for r in trainer.client_metrics.values()])
    assert logs["accuracy_client_mean"] == pytest.approx(client_mean)


def test_personal_models_for_clients_with_state_global_model_for_the_others(clients, data):
    trainer = linear_trainer(data, personal_toy())
    trainer.fit(rounds=2, clients_per_round=3, batch_size=4, verbose=0)
    with_state = [c for c in clients if c in trainer.client_states]
    assert 0 < len(with_state) < len(clients)
    logs = trainer.evaluate(data, batch_size=4, per_client=True)
    assert logs["personalized_clients"] == len(with_state)
    assert logs["global_clients"] == len(clients) - len(with_state)
    want = {}
    for cid, ex in clients.items():
        if cid in with_state:
            personal = jax.tree.map(jnp.add, trainer.server_state.params, trainer.client_states.get(cid))
            want[cid] = numpy_client(personal, ex)
        else:
            want[cid] = numpy_client(trainer.params, ex)
    for cid, row in trainer.client_metrics.items():
        assert row["personalized"] is (cid in with_state)
        assert row["loss"] == pytest.approx(want[cid]["loss"][0] / want[cid]["loss"][1], rel=1e-5), cid
        assert row["accuracy"] == pytest.approx(want[cid]["accuracy"][0] / want[cid]["accuracy"][1]), cid
    summary = summarize_clients(want)
    assert logs["loss"] == pytest.approx(summary["loss"], rel=1e-5)
    # the personal models differ from the global one, and evaluate() uses them without per_client too
    on_global = trainer._evaluator.evaluate(trainer.params, data)
    assert abs(logs["loss"] - on_global["loss"]) > 1e-4
    assert trainer.evaluate(data)["loss"] == pytest.approx(logs["loss"], rel=1e-6)


@pytest.mark.parametrize("lanes", [1, 3, 8])
def test_personal_totals_do_not_depend_on_lanes(clients, data, lanes):
    trainer = linear_trainer(data, personal_toy())
    trainer.fit(rounds=3, clients_per_round=6, batch_size=4, verbose=0)
    ids = [c for c in clients if c in trainer.client_states]
    states = [trainer.client_states.get(c) for c in ids]
    got = trainer._evaluator.personal_totals(trainer.algorithm.personal_params, trainer.server_state, states, data,
                                             ids, batch_size=5, lanes=lanes)
    want = {c: numpy_client(jax.tree.map(jnp.add, trainer.server_state.params, s), clients[c])
            for c, s in zip(ids, states)}
    assert_totals_close(got, want)


def test_clients_unknown_to_the_training_data_warn_once_and_use_the_global_model(data):
    trainer = linear_trainer(data, personal_toy())
    trainer.fit(rounds=1, clients_per_round=3, batch_size=4, verbose=0)
    other = make_clients(num_clients=5, seed=9)
    foreign = fedtrain.InMemoryFederatedData({f"new_{k}": v for k, v in other.items()})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logs = trainer.evaluate(foreign, per_client=True)
    messages = [str(w.message) for w in caught if "global model" in str(w.message)]
    assert len(messages) == 1 and "5 of the 5" in messages[0]
    assert logs["personalized_clients"] == 0 and logs["global_clients"] == 5
    plain = trainer._evaluator.evaluate(trainer.params, foreign)
    assert logs["loss"] == pytest.approx(plain["loss"], rel=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # training clients never sampled: no warning
        trainer.evaluate(data)


def test_best_of_models_give_per_client_results_too(clients, data):
    alg = fedtrain.algorithms.hypcluster(optax.sgd(0.5), num_clusters=2)
    trainer = linear_trainer(data, alg)
    trainer.fit(rounds=2, clients_per_round=4, batch_size=5, verbose=0)
    plain = trainer.evaluate(data)
    logs = trainer.evaluate(data, per_client=True)
    for k in ("loss", "accuracy", "model_share_0", "model_share_1"):
        assert logs[k] == pytest.approx(plain[k], rel=1e-6)
    stacked = alg.eval_models(trainer.server_state)
    for cid, row in trainer.client_metrics.items():
        model = jax.tree.map(lambda x, j=row["model"]: x[j], stacked)
        ref = numpy_client(model, clients[cid])
        assert row["loss"] == pytest.approx(ref["loss"][0] / ref["loss"][1], rel=1e-5)


def test_fit_validation_per_client_logs_csv_and_tensorboard_histograms(clients, data, tmp_path):
    trainer = linear_trainer(data)
    path = tmp_path / "log.csv"
    history = trainer.fit(rounds=3, clients_per_round=4, batch_size=5, verbose=0, validation_data=data,
                          validation_freq=2, validation_per_client=True,
                          callbacks=[CSVLogger(path), TensorBoard(tmp_path / "tb")])
    for key in ("val_accuracy_p10", "val_accuracy_p50", "val_accuracy_p90", "val_loss_worst10",
                "val_loss_client_mean", "val_num_clients"):
        assert key in history.history, key
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert "val_accuracy_p90" in rows[0] and len(rows) == 3
    last = trainer.client_metrics
    histos = read_histograms(tmp_path / "tb")["validation"]
    steps = [s for s, _ in histos["clients/accuracy"]]
    assert steps == [1, 2]  # validation after rounds 2 and 3 (0-indexed 1, 2)
    h = histos["clients/accuracy"][-1][1]
    assert h.num == len(clients)
    assert h.sum == pytest.approx(sum(r["accuracy"] for r in last.values()), rel=1e-6)
    assert histos["clients/loss"][-1][1].max == pytest.approx(max(r["loss"] for r in last.values()), rel=1e-6)
    scalars = read_scalars(tmp_path / "tb")["validation"]
    assert scalars["accuracy_p50"][-1][1] == pytest.approx(history.history["val_accuracy_p50"][-1], rel=1e-6)


def test_tensorboard_unknown_metric_histogram_is_named(data, tmp_path):
    trainer = linear_trainer(data)
    with pytest.raises(ValueError, match="no per-client metric.*'f1'"):
        trainer.fit(rounds=1, clients_per_round=2, batch_size=5, verbose=0, validation_data=data,
                    validation_per_client=True, callbacks=[TensorBoard(tmp_path, validation_histograms=["f1"])])


def test_plot_distribution_band_writes_a_png(data, tmp_path):
    pytest.importorskip("matplotlib")
    from fedtrain.logs.plots import main, plot_run

    trainer = linear_trainer(data)
    trainer.fit(rounds=3, clients_per_round=4, batch_size=5, verbose=0, validation_data=data,
                validation_per_client=True, callbacks=[CSVLogger(tmp_path / "metrics.csv")])
    out = plot_run(tmp_path, tmp_path / "band.png", distribution=True)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([str(tmp_path), "-o", str(tmp_path / "cli.png"), "--distribution"]) == 0
    assert (tmp_path / "cli.png").stat().st_size > 1000
    proc = subprocess.run([sys.executable, "-m", "fedtrain", "plot", tmp_path.name, "-o", "band_cli.png",
                           "--distribution"], cwd=tmp_path.parent, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path.parent / "band_cli.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = plot_run(tmp_path, tmp_path / "curves.png")  # without the option: unchanged behaviour works
    assert fig.exists()


def test_plot_distribution_without_percentiles_is_a_clear_error(data, tmp_path):
    pytest.importorskip("matplotlib")
    from fedtrain.logs.plots import plot_curves

    with pytest.raises(ValueError, match="validation_per_client=True"):
        plot_curves([0, 1], {"loss": [1.0, 0.5], "val_loss": [1.1, 0.6]}, distribution=True)


def test_bad_input_errors(data):
    trainer = linear_trainer(data)
    empty = fedtrain.InMemoryFederatedData({"a": {"x": np.zeros((0, 8), np.float32), "y": np.zeros((0,), np.int32)}})
    with pytest.raises(ValueError, match="no examples"):
        trainer.evaluate(empty, per_client=True)
    with pytest.raises(TypeError, match="per_client must be True or False"):
        trainer.evaluate(data, per_client="yes")
    with pytest.raises(TypeError, match="validation_per_client"):
        trainer.fit(rounds=1, clients_per_round=2, validation_data=data, validation_per_client=1, verbose=0)
    ev = Evaluator(trainer.model_fns)
    with pytest.raises(ValueError, match="lanes must be >= 1"):
        ev.personal_totals(lambda s, c: s, trainer.params, [], data, [], lanes=0)
    with pytest.raises(ValueError, match="2 client states for 1 clients"):
        ev.personal_totals(lambda s, c: s, trainer.params, [0, 0], data, ["client_000"])
