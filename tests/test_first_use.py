"""What a new user hits first: the data forms the README names, checks before round 1 (features,
labels, initial loss), the trained module, honest messages, evaluation progress and predict."""

import io
import subprocess
import sys
import warnings

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import fedtrain
from fedtrain.callbacks import Callback, ProgressBar, TerminateOnNaN
from tests.conftest import TinyMLP


def make_trainer(data, lr=0.1, model=None, **kw):
    model = model if model is not None else TinyMLP(rngs=nnx.Rngs(0))
    return fedtrain.FederatedTrainer(model, data, fedtrain.algorithms.fedavg(optax.sgd(lr)), **kw)


class CountRounds(Callback):
    def __init__(self):
        super().__init__()
        self.began = 0
        self.rounds = 0

    def on_train_begin(self, logs=None):
        self.began += 1

    def on_round_end(self, round, logs=None):
        self.rounds += 1


FIT = dict(clients_per_round=3, batch_size=4, verbose=0)


# ---------------------------------------------------------------------- the data forms of the README
def test_a_dict_of_clients_trains_like_in_memory_data(clients):
    by_dict = make_trainer(clients)
    by_dict.fit(rounds=2, **FIT)
    by_data = make_trainer(fedtrain.InMemoryFederatedData(clients))
    by_data.fit(rounds=2, **FIT)
    for a, b in zip(jax.tree.leaves(by_dict.params), jax.tree.leaves(by_data.params)):
        np.testing.assert_array_equal(a, b)
    assert set(by_dict.evaluate(clients)) == {"loss", "accuracy"}
    assert by_dict.fit(clients, rounds=3, validation_data=clients, **FIT).rounds == [0, 1, 2]


def test_a_store_path_trains(clients, tmp_path, monkeypatch):
    from fedtrain.data.convert import write_store

    write_store(fedtrain.InMemoryFederatedData(clients), tmp_path / "train.sqlite")
    monkeypatch.chdir(tmp_path)
    trainer = make_trainer("train.sqlite")  # a relative path, as a user types it
    trainer.fit(rounds=1, **FIT)
    assert trainer.evaluate("train.sqlite")["loss"] > 0


@pytest.mark.parametrize("bad, names", [
    ({"x": np.zeros((10, 8), np.float32), "y": np.zeros(10, np.int32)}, ["from_arrays", "partitioners"]),
    ((np.zeros((10, 8), np.float32), np.zeros(10, np.int32)), ["InMemoryFederatedData", "from_arrays", "open_store"]),
    (np.zeros((10, 8), np.float32), ["InMemoryFederatedData", "from_arrays", "open_store"]),
])
def test_other_data_shapes_are_named_with_the_fix(bad, names, data):
    with pytest.raises(TypeError) as err:
        make_trainer(bad)
    assert all(n in str(err.value) for n in names), str(err.value)
    trainer, counter = make_trainer(data), CountRounds()
    with pytest.raises(TypeError) as err:  # as validation data: before any round or callback
        trainer.fit(rounds=2, validation_data=bad, callbacks=[counter], **FIT)
    assert all(n in str(err.value) for n in names) and counter.began == 0 and trainer.round == 0


def test_a_missing_store_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing_here.sqlite"):
        make_trainer(str(tmp_path / "nothing_here.sqlite"))


# ---------------------------------------------------------------------- checks before round 1
@pytest.mark.parametrize("label, expected", [(3, r"\[0, 3\].*3 logits.*\[0, 2\]"), (-1, r"\[-1, 2\]")])
def test_labels_outside_the_models_outputs_stop_before_training(clients, label, expected):
    clients = dict(clients)
    last = sorted(clients)[-1]
    clients[last] = dict(clients[last], y=np.where(np.arange(len(clients[last]["y"])) == 0, label,
                                                   clients[last]["y"]).astype(np.int32))
    counter = CountRounds()
    with pytest.raises(ValueError, match=expected) as err:
        make_trainer(clients).fit(rounds=1, callbacks=[counter], **FIT)
    assert last in str(err.value) and counter.began == 0


def test_validation_labels_are_checked_before_round_1(data, clients):
    bad = {c: dict(v, y=np.full_like(v["y"], 7)) for c, v in list(clients.items())[:2]}
    counter = CountRounds()
    with pytest.raises(ValueError, match="validation_data.*labels 'y'"):
        make_trainer(data).fit(rounds=1, validation_data=bad, callbacks=[counter], **FIT)
    assert counter.began == 0


def test_every_clients_features_are_checked_before_round_1(clients):
    clients = dict(clients)
    last = sorted(clients)[-1]
    clients[last] = dict(clients[last], x=clients[last]["x"][:, :5])
    counter = CountRounds()
    with pytest.raises(ValueError, match=rf"{last}.*feature 'x' has shape"):
        make_trainer(clients).fit(rounds=1, callbacks=[counter], **FIT)
    assert counter.began == 0


def test_validation_features_are_checked_before_round_1(data, clients):
    bad = {c: dict(v) for c, v in list(clients.items())[:3]}
    bad["client_002"]["x"] = bad["client_002"]["x"].astype(np.int32)
    counter = CountRounds()
    with pytest.raises(TypeError, match="validation_data: client 'client_002': feature 'x' has dtype int32"):
        make_trainer(data).fit(rounds=1, validation_data=bad, callbacks=[counter], **FIT)
    assert counter.began == 0


def _text_clients(num=6, length=12, vocab=fedtrain.models.shakespeare.VOCAB_SIZE):
    rng = np.random.default_rng(0)
    out = {}
    for i in range(num):
        x = rng.integers(1, vocab, (5, length)).astype(np.int32)
        x[:, -4:] = 0  # PAD
        out[f"role_{i}"] = {"x": x, "y": np.roll(x, -1, axis=1)}
    return out


def small_lstm():
    return fedtrain.models.ShakespeareLSTM(embed_size=4, hidden_size=8, num_layers=1, rngs=nnx.Rngs(0))


def test_zoo_sequence_models_carry_their_loss_and_metrics():
    trainer = make_trainer(_text_clients(), model=small_lstm(), lr=1.0)
    names = [m.name for m in trainer.model_fns.metrics]
    assert names == ["accuracy", "accuracy_no_eos"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        trainer.fit(rounds=1, clients_per_round=3, batch_size=4, verbose=0)
    # the loss ignores PAD targets: it equals the mean over non-PAD tokens computed by hand
    batch = _text_clients()["role_0"]
    logits = np.asarray(trainer.predict(batch["x"]), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, batch["y"][..., None], -1)[..., 0]
    keep = batch["y"] != 0
    got = trainer.evaluate({"role_0": batch})["loss"]
    np.testing.assert_allclose(got, nll[keep].mean(), rtol=1e-4)


def test_a_loss_that_does_not_fit_the_model_is_reported_before_training():
    model = small_lstm()
    with pytest.warns(RuntimeWarning, match=r"untrained model's loss is .* far above log\(90\)"):
        fedtrain.FederatedTrainer(model, _text_clients(), fedtrain.algorithms.fedavg(optax.sgd(1.0)),
                                  loss="sparse_categorical_crossentropy",
                                  metrics=["accuracy"]).fit(rounds=1, clients_per_round=2, batch_size=4, verbose=0)


# ---------------------------------------------------------------------- the trained module
def test_fit_trains_the_module_passed_in(data):
    module = TinyMLP(rngs=nnx.Rngs(0))
    before = np.array(module.l1.kernel[...])
    trainer = make_trainer(data, model=module)
    trainer.fit(rounds=2, **FIT)
    np.testing.assert_array_equal(module.l1.kernel[...], nnx.to_pure_dict(trainer.params)["l1"]["kernel"])
    assert not np.array_equal(before, module.l1.kernel[...])
    np.testing.assert_array_equal(trainer.model_fns.init_params["l1"]["kernel"][...], before)  # still the init
    after_first = np.array(module.l1.kernel[...])
    trainer.fit(rounds=4, **FIT)  # the next fit's buffer donation must not touch the module's arrays
    assert np.isfinite(np.asarray(module(np.ones((2, 8), np.float32)))).all()
    assert not np.array_equal(after_first, module.l1.kernel[...])


# ---------------------------------------------------------------------- honest messages
def test_nan_warning_says_training_goes_on_without_terminate_on_nan(data):
    with pytest.warns(RuntimeWarning, match="Training goes on; add fedtrain.callbacks.TerminateOnNaN"):
        trainer = make_trainer(data, lr=1e30)
        trainer.fit(rounds=2, **FIT)
    assert trainer.round == 2
    with pytest.warns(RuntimeWarning, match="TerminateOnNaN stops training after this round"):
        trainer = make_trainer(data, lr=1e30)
        trainer.fit(rounds=3, callbacks=[TerminateOnNaN()], **FIT)
    assert trainer.round < 3


def test_privacy_module_is_reachable_after_import_fedtrain(tmp_path):
    code = "import fedtrain; print(fedtrain.privacy.DPAccountant.__name__, fedtrain.experiment.build.__name__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["DPAccountant", "build"]


def test_recipes_load_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = fedtrain.experiment.get_config("emnist_fedavg", "tiny")
    assert config.task == "emnist" and config.algorithm == "fedavg"


# ---------------------------------------------------------------------- evaluation progress, timing
def test_evaluate_shows_progress_and_fit_times_training_and_validation_apart(data):
    trainer = make_trainer(data)
    seen = []

    class Batches(Callback):
        def on_test_batch_end(self, batch, logs=None):
            seen.append((batch, logs["examples"], logs["total_examples"]))

    out = io.StringIO()
    logs = trainer.evaluate(data, batch_size=16, callbacks=[Batches(), ProgressBar(file=out)], verbose=1)
    total = int(data.client_sizes().sum())
    assert seen[-1][1:] == (total, total) and [b for b, _, _ in seen] == list(range(len(seen)))
    assert len(seen) == -(-total // 16) and f"Evaluated {total:,} examples" in out.getvalue()
    assert logs["loss"] > 0
    out = io.StringIO()
    history = trainer.fit(rounds=3, validation_data=data, callbacks=[ProgressBar(file=out)],
                          clients_per_round=3, batch_size=4)
    lines = out.getvalue().splitlines()
    assert "first round" in lines[0] and "rounds/s" in lines[1] and "Evaluated" not in out.getvalue()
    assert len(history.history["val_time"]) == 3 and all(t > 0 for t in history.history["val_time"])
    assert all(t > 0 for t in history.history["round_time"])


# ---------------------------------------------------------------------- predict
def test_predict_on_federated_data_gives_outputs_per_client(data, clients):
    trainer = make_trainer(data)
    out = trainer.predict(data)
    assert list(out) == data.client_ids
    for cid, logits in out.items():
        np.testing.assert_allclose(logits, trainer.predict(clients[cid]["x"]), rtol=1e-6)
        assert logits.shape == (len(clients[cid]["x"]), 3)
    assert list(trainer.predict(clients)) == list(clients)
    assert trainer.predict(clients["client_000"]["x"].tolist()).shape == (len(clients["client_000"]["x"]), 3)
    with pytest.raises(TypeError, match="leading batch axis or federated data"):
        trainer.predict(3.0)



def test_restore_writes_the_restored_weights_into_the_module(data, tmp_path):
    trainer = make_trainer(data)
    trainer.fit(rounds=2, callbacks=[fedtrain.callbacks.OrbaxCheckpoint(str(tmp_path / "ckpt"), async_save=False)],
                **FIT)
    module = TinyMLP(rngs=nnx.Rngs(1))
    fresh = make_trainer(data, model=module)
    assert fresh.restore(str(tmp_path / "ckpt")) == 2
    np.testing.assert_array_equal(module.l1.kernel[...], nnx.to_pure_dict(trainer.params)["l1"]["kernel"])
