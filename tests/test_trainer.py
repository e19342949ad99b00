"""FederatedTrainer: Keras semantics, callbacks, evaluation and clear errors on bad input."""

import io
import warnings

import numpy as np
import optax
import pytest
from flax import nnx

import fedtrain
from fedtrain.callbacks import Callback, LambdaCallback, ProgressBar
from tests.conftest import TinyMLP, make_clients


def make_trainer(data, lr=0.1, **kw):
    return fedtrain.FederatedTrainer(TinyMLP(rngs=nnx.Rngs(0)), data, fedtrain.algorithms.fedavg(optax.sgd(lr)), **kw)


class Recorder(Callback):
    def __init__(self):
        super().__init__()
        self.events = []

    def on_train_begin(self, logs=None):
        self.events.append(("train_begin",))

    def on_round_begin(self, round, logs=None):
        self.events.append(("round_begin", round))
        super().on_round_begin(round, logs)

    def on_epoch_begin(self, epoch, logs=None):
        self.events.append(("epoch_begin", epoch))

    def on_epoch_end(self, epoch, logs=None):
        self.events.append(("epoch_end", epoch, dict(logs)))

    def on_clients_sampled(self, round, client_ids):
        self.events.append(("sampled", round, list(client_ids)))

    def on_client_results(self, round, client_ids, client_logs):
        self.events.append(("client_results", round, list(client_ids), client_logs))

    def on_test_begin(self, logs=None):
        self.events.append(("test_begin",))

    def on_train_end(self, logs=None):
        self.events.append(("train_end",))


def test_fit_runs_hooks_in_keras_order(data):
    rec = Recorder()
    trainer = make_trainer(data)
    history = trainer.fit(rounds=3, clients_per_round=4, batch_size=5, verbose=0, callbacks=[rec],
                          validation_data=data, validation_freq=2)
    kinds = [e[0] for e in rec.events]
    assert kinds[0] == "train_begin" and kinds[-1] == "train_end"
    assert kinds.count("round_begin") == kinds.count("epoch_begin") == kinds.count("epoch_end") == 3
    # Round r: begin -> sampled -> client results -> (validation) -> end.
    first = kinds[1:kinds.index("epoch_end") + 1]
    assert first == ["round_begin", "epoch_begin", "sampled", "client_results", "epoch_end"]
    assert kinds.count("test_begin") == 2  # after rounds 2 and 3 (freq 2, and the last round)
    ends = [e for e in rec.events if e[0] == "epoch_end"]
    assert [e[1] for e in ends] == [0, 1, 2]
    logs = ends[-1][2]
    for key in ["loss", "accuracy", "num_clients", "num_examples", "update_norm", "round_time", "val_loss",
                "val_accuracy"]:
        assert isinstance(logs[key], float), key
    assert logs["num_clients"] == 4.0
    sampled = [e for e in rec.events if e[0] == "sampled"]
    results = [e for e in rec.events if e[0] == "client_results"]
    assert [s[2] for s in sampled] == [r[2] for r in results]
    client_logs = results[0][3]
    assert len(client_logs) == 4 and {"loss", "accuracy", "num_examples", "update_norm"} <= set(client_logs[0])
    sizes = {cid: len(data.get_client(cid)["y"]) for cid in data.client_ids}
    assert [c["num_examples"] for c in client_logs] == [sizes[c] for c in results[0][2]]
    assert logs["num_examples"] == sum(sizes[c] for c in results[-1][2])
    # Round loss is the example-weighted mean of the clients' losses.
    r0 = results[0][3]
    expected = sum(c["loss"] * c["num_examples"] for c in r0) / sum(c["num_examples"] for c in r0)
    assert history.history["loss"][0] == pytest.approx(expected, rel=1e-5)
    assert history.rounds == [0, 1, 2]
    assert np.isnan(history.history["val_loss"][0]) and not np.isnan(history.history["val_loss"][1])
    assert trainer.history is history and trainer.round == 3


def test_training_learns_and_evaluate_matches_numpy(data):
    trainer = make_trainer(data, lr=0.2)
    before = trainer.evaluate(data)
    trainer.fit(rounds=15, clients_per_round=6, batch_size=8, verbose=0)
    after = trainer.evaluate(data, batch_size=7)
    assert after["loss"] < 0.7 * before["loss"] and after["accuracy"] > before["accuracy"]
    xs = np.concatenate([data.get_client(c)["x"] for c in data.client_ids])
    ys = np.concatenate([data.get_client(c)["y"] for c in data.client_ids])
    logits = trainer.predict(xs, batch_size=32)
    assert logits.shape == (len(xs), 3)
    assert after["accuracy"] == pytest.approx(float(np.mean(np.argmax(logits, -1) == ys)), abs=1e-6)
    shifted = logits - logits.max(-1, keepdims=True)
    nll = -(shifted[np.arange(len(ys)), ys] - np.log(np.exp(shifted).sum(-1)))
    assert after["loss"] == pytest.approx(float(nll.mean()), rel=1e-4)


def test_stop_training_and_continuation_are_deterministic(data):
    stopper = LambdaCallback(on_round_end=lambda r, logs: setattr(stopper.trainer, "stop_training", r == 1))
    trainer = make_trainer(data, seed=5)
    trainer.fit(rounds=10, clients_per_round=3, batch_size=4, verbose=0, callbacks=[stopper])
    assert trainer.round == 2
    trainer.fit(rounds=4, clients_per_round=3, batch_size=4, verbose=0)  # continues from round 2
    straight = make_trainer(data, seed=5)
    straight.fit(rounds=4, clients_per_round=3, batch_size=4, verbose=0)
    a = nnx.to_pure_dict(trainer.params)
    b = nnx.to_pure_dict(straight.params)
    np.testing.assert_array_equal(a["l1"]["kernel"], b["l1"]["kernel"])
    assert trainer.history.rounds == [0, 1, 2, 3]


def test_progress_bar_prints_plain_lines_off_a_terminal(data):
    out = io.StringIO()
    make_trainer(data).fit(rounds=2, clients_per_round=3, batch_size=4, callbacks=[ProgressBar(file=out)])
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("Round 1/2") and lines[1].startswith("Round 2/2")
    assert "loss:" in lines[1] and "rounds/s" in lines[1]


def test_update_module_writes_params_back(data):
    module = TinyMLP(rngs=nnx.Rngs(0))
    trainer = fedtrain.FederatedTrainer(module, data, fedtrain.algorithms.fedavg(optax.sgd(0.1)))
    trainer.fit(rounds=1, clients_per_round=2, batch_size=4, verbose=0)
    trainer.update_module()
    np.testing.assert_array_equal(np.asarray(module.l1.kernel[...]),
                                  np.asarray(nnx.to_pure_dict(trainer.params)["l1"]["kernel"]))


# ---------------------------------------------------------------- bad input
def test_too_many_clients_per_round(data):
    with pytest.raises(ValueError, match=r"clients_per_round=50 is larger than the 12 clients.*<= 12"):
        make_trainer(data).fit(rounds=1, clients_per_round=50, verbose=0)


def test_empty_dataset():
    with pytest.raises(ValueError, match="no clients"):
        make_trainer(fedtrain.InMemoryFederatedData({})).fit(rounds=1, verbose=0)


def test_no_training_data():
    with pytest.raises(ValueError, match="no training data"):
        make_trainer(None).fit(rounds=1, verbose=0)


def test_client_with_zero_examples_is_skipped_with_a_warning(clients):
    clients["nobody"] = {"x": np.zeros((0, 8), np.float32), "y": np.zeros((0,), np.int32)}
    data = fedtrain.InMemoryFederatedData(clients)
    trainer = make_trainer(data)
    with pytest.warns(UserWarning, match=r"1 of 13 clients have no examples.*nobody"):
        trainer.fit(rounds=2, clients_per_round=12, batch_size=4, verbose=0)
    assert "nobody" not in trainer.last_round_info["client_ids"]


def test_missing_feature_is_named(clients):
    clients = {k: {"features": v["x"], "y": v["y"]} for k, v in clients.items()}
    with pytest.raises(ValueError, match=r"reads feature 'x'.*\['features', 'y'\].*input_key"):
        make_trainer(fedtrain.InMemoryFederatedData(clients)).fit(rounds=1, verbose=0)


def test_wrong_feature_shape_fails_before_compiling(clients):
    clients = {k: {"x": v["x"][:, :5], "y": v["y"]} for k, v in clients.items()}
    trainer = make_trainer(fedtrain.InMemoryFederatedData(clients))
    with pytest.raises(ValueError, match=r"cannot run on this data \(batch \{'x': 'float32\[32, 5\]'"):
        trainer.fit(rounds=1, verbose=0)
    assert trainer.engine.compilations == 0


def test_text_features_are_rejected_with_the_fix(clients):
    clients = {k: {"x": v["x"], "y": v["y"].astype(str)} for k, v in clients.items()}
    with pytest.raises(TypeError, match="integer ids"):
        make_trainer(fedtrain.InMemoryFederatedData(clients)).fit(rounds=1, verbose=0)


def test_inconsistent_client_is_named(clients):
    clients["client_005"]["x"] = clients["client_005"]["x"][:, :4]
    data = fedtrain.InMemoryFederatedData(clients)
    with pytest.raises(ValueError, match=r"client 'client_005': feature 'x' has shape"):
        make_trainer(data).fit(rounds=1, clients_per_round=12, verbose=0)


def test_ragged_client_is_rejected():
    with pytest.raises(ValueError, match=r"client 'a'.*different numbers of examples"):
        fedtrain.InMemoryFederatedData({"a": {"x": np.zeros((3, 2)), "y": np.zeros(2)}})


def test_unknown_client_is_named(data):
    with pytest.raises(fedtrain.data.UnknownClientError, match="unknown client id 'zzz'"):
        data.get_client("zzz")


def test_not_an_algorithm(data):
    with pytest.raises(TypeError, match="fedtrain.algorithms.Algorithm"):
        fedtrain.FederatedTrainer(TinyMLP(rngs=nnx.Rngs(0)), data, optax.sgd(0.1))


def test_unknown_backend(data):
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        make_trainer(data, backend="gpu")


def test_bad_batch_settings(data):
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        make_trainer(data).fit(rounds=1, batch_size=0, verbose=0)
    with pytest.raises(ValueError, match="local_epochs, local_steps or both"):
        make_trainer(data).fit(rounds=1, local_epochs=None, verbose=0)


def test_nan_loss_is_reported_with_round_and_clients(clients):
    clients["client_003"]["x"][0, 0] = np.nan
    data = fedtrain.InMemoryFederatedData(clients)
    trainer = make_trainer(data)
    with pytest.warns(RuntimeWarning, match=r"round 1: the training loss is nan; clients with a non-finite loss: "
                                            r"\['client_003'\]"):
        trainer.fit(rounds=1, clients_per_round=12, batch_size=4, verbose=0)


def test_debug_backend_names_the_failing_client(clients):
    clients["client_003"]["x"][0, 0] = np.nan
    data = fedtrain.InMemoryFederatedData(clients)
    with pytest.raises(fedtrain.ClientStepError, match=r"round 1, client 'client_003' .*local step \d+/\d+: the loss is nan"):
        make_trainer(data, backend="debug").fit(rounds=1, clients_per_round=12, batch_size=4, verbose=0)


def test_fit_with_nothing_to_do_says_so(data):
    trainer = make_trainer(data)
    trainer.fit(rounds=1, clients_per_round=2, batch_size=4, verbose=0)
    with pytest.warns(UserWarning, match=r"fit\(rounds=1\) trains nothing: 1 rounds are completed.*rounds > 1"):
        history = trainer.fit(rounds=1, clients_per_round=2, batch_size=4, verbose=0)
    assert history.rounds == [0] and trainer.round == 1
    with warnings.catch_warnings():  # training further says nothing
        warnings.simplefilter("error")
        trainer.fit(rounds=2, clients_per_round=2, batch_size=4, verbose=0)
    assert trainer.history.rounds == [0, 1]


def test_lambda_callback_rejects_unknown_hooks():
    with pytest.raises(TypeError, match="on_round_finish"):
        LambdaCallback(on_round_finish=print)


def test_local_steps_repeat_small_clients():
    data = fedtrain.InMemoryFederatedData(make_clients(num_clients=4, min_size=2, max_size=3))
    trainer = make_trainer(data)
    trainer.fit(rounds=1, clients_per_round=4, batch_size=4, local_epochs=None, local_steps=5, verbose=0)
    assert trainer.history.history["num_examples"][0] == 4 * 5 * 4


def test_algorithm_model_mismatch_is_named(data):
    base = fedtrain.algorithms.fedavg(optax.sgd(0.1))
    needs_conv = base._replace(name="needs_conv", init=lambda params: params["conv"])
    with pytest.raises(TypeError, match=r"algorithm 'needs_conv' cannot be initialised with the parameters of TinyMLP"):
        fedtrain.FederatedTrainer(TinyMLP(rngs=nnx.Rngs(0)), data, needs_conv)


def test_uniform_sampler_is_a_pure_function_of_seed_and_round():
    sampler = fedtrain.samplers.UniformSampler()
    a = sampler.sample(1, 7, 100, 10)
    np.testing.assert_array_equal(a, sampler.sample(1, 7, 100, 10))
    assert len(set(a.tolist())) == 10 and a.min() >= 0 and a.max() < 100
    assert not np.array_equal(a, sampler.sample(1, 8, 100, 10))
    assert not np.array_equal(a, sampler.sample(2, 7, 100, 10))
    counts = np.bincount(np.concatenate([sampler.sample(0, r, 20, 5) for r in range(2000)]), minlength=20)
    assert counts.min() > 0.85 * 500 and counts.max() < 1.15 * 500  # uniform: 2000*5/20 = 500 each
    assert sampler.sampling_probability(20, 5) == 0.25


def test_state_dict_roundtrip_continues_identically(data):
    import jax

    first = make_trainer(data, seed=2)
    first.fit(rounds=2, clients_per_round=3, batch_size=4, verbose=0)
    state = jax.device_get(first.state_dict())
    resumed = make_trainer(data, seed=2)
    resumed.load_state_dict(state)
    assert resumed.round == 2 and resumed.history.rounds == [0, 1]
    resumed.fit(rounds=4, clients_per_round=3, batch_size=4, verbose=0)
    straight = make_trainer(data, seed=2)
    straight.fit(rounds=4, clients_per_round=3, batch_size=4, verbose=0)
    a, b = nnx.to_pure_dict(resumed.params), nnx.to_pure_dict(straight.params)
    np.testing.assert_array_equal(a["l2"]["kernel"], b["l2"]["kernel"])
    assert resumed.history.history["loss"] == straight.history.history["loss"]
    other = fedtrain.FederatedTrainer(TinyMLP(hidden=5, rngs=nnx.Rngs(0)), data,
                                      fedtrain.algorithms.fedavg(optax.sgd(0.1)))
    with pytest.raises(ValueError, match=r"saved server state .params\['l1'\]\['bias'\].value has shape \(16,\), this trainer has \(5,\)"):
        other.load_state_dict(state)
    adam = fedtrain.FederatedTrainer(TinyMLP(rngs=nnx.Rngs(0)), data, fedtrain.algorithms.fedadam(optax.sgd(0.1)))
    with pytest.raises(ValueError, match="saved by algorithm 'fedavg', this trainer runs 'fedadam'"):
        adam.load_state_dict(state)
