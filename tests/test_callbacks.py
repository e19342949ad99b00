"""Callbacks: schedules, early stopping, NaN handling, CSV/JSON-lines/TensorBoard logs read back, plots."""

import csv
import json
import math
import warnings

import numpy as np
import optax
import pytest
from flax import nnx

import fedtrain
from fedtrain.callbacks import (
    Callback, CSVLogger, EarlyStopping, JSONLinesLogger, LearningRateScheduler, ReduceLROnPlateau, TensorBoard,
    TerminateOnNaN)
from fedtrain.logs.events import read_histograms, read_scalars
from tests.conftest import TinyMLP


def injected_algo(client_lr=0.1, server_lr=1.0):
    return fedtrain.algorithms.fedopt(optax.inject_hyperparams(optax.sgd)(learning_rate=client_lr),
                                      optax.inject_hyperparams(optax.sgd)(learning_rate=server_lr))


def make_trainer(data, algo=None, **kw):
    return fedtrain.FederatedTrainer(TinyMLP(rngs=nnx.Rngs(0)), data, algo or injected_algo(), **kw)


FIT = dict(clients_per_round=3, batch_size=8, verbose=0)


class Logs(Callback):
    def __init__(self):
        super().__init__()
        self.logs = []

    def on_round_end(self, round, logs=None):
        self.logs.append(dict(logs))


def test_lr_scheduler_server_and_client_without_recompiling(data):
    trainer = make_trainer(data)
    history = trainer.fit(rounds=4, **FIT, callbacks=[
        LearningRateScheduler(lambda r: 0.1 / (r + 1), target="client"),
        LearningRateScheduler(lambda r, lr: lr * 0.5)])
    assert trainer.engine.compilations == 1
    assert history.history["learning_rate"] == [0.5, 0.25, 0.125, 0.0625]
    np.testing.assert_allclose(history.history["client_learning_rate"], [0.1, 0.05, 0.1 / 3, 0.025], rtol=1e-6)
    # The injected value really is used: client rate 0 means no client moves, so no update.
    frozen = make_trainer(data)
    frozen.fit(rounds=1, **FIT, callbacks=[LearningRateScheduler(lambda r: 0.0, target="client")])
    assert frozen.last_round_info and math.isclose(frozen.history.history["update_norm"][0], 0.0, abs_tol=0.0)


@pytest.mark.parametrize("algo", ["mime", "mime_lite"])
def test_mime_schedule_reaches_the_clients_frozen_optimizer(data, algo):
    """Mime's clients step with the server optimizer's state, so its server value is what they use."""
    build = getattr(fedtrain.algorithms, algo)
    trainer = make_trainer(data, build(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)))
    assert "client_learning_rate" not in trainer.hyperparams
    history = trainer.fit(rounds=3, **FIT, callbacks=[LearningRateScheduler(lambda r: 0.1 if r == 0 else 0.0)])
    assert history.history["update_norm"][0] > 0
    assert history.history["update_norm"][1:] == [0.0, 0.0]


def test_lr_scheduler_needs_injected_hyperparams(data):
    trainer = make_trainer(data, fedtrain.algorithms.fedavg(optax.sgd(0.1)))
    with pytest.raises(ValueError, match="inject_hyperparams"):
        trainer.fit(rounds=1, **FIT, callbacks=[LearningRateScheduler(lambda r: 0.1)])
    with pytest.raises(ValueError, match="inject_hyperparams"):
        trainer.fit(rounds=1, **FIT, callbacks=[LearningRateScheduler(lambda r: 0.1, target="client")])


def test_reduce_lr_on_plateau_reduces_the_server_rate(data):
    trainer = make_trainer(data)
    values = iter([1.0, 0.5, 0.6, 0.7, 0.4, 0.9, 0.9, 0.9])

    class Fake(Callback):
        def on_round_end(self, round, logs=None):
            logs["val_loss"] = next(values)

    cb = ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=2, min_lr=0.3)
    history = trainer.fit(rounds=8, **FIT, callbacks=[Fake(), cb])
    # Rates logged at each round's end: reduced after rounds 4 and 7 (two rounds without improvement).
    np.testing.assert_allclose(history.history["learning_rate"], [1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.3], rtol=1e-6)
    assert trainer.get_hyperparam("learning_rate") == pytest.approx(0.3)
    assert trainer.engine.compilations == 1
    with pytest.raises(ValueError, match="factor >= 1.0"):
        ReduceLROnPlateau(factor=1.5)


def test_early_stopping_patience_start_and_restore_best(data):
    trainer = make_trainer(data)
    values = iter([5.0, 3.0, 4.0, 1.0, 2.0, 2.5, 2.5, 2.5, 2.5])
    states = []

    class Fake(Callback):
        def on_round_end(self, round, logs=None):
            logs["val_loss"] = next(values)
            states.append(self.trainer.server_state)

    es = EarlyStopping(monitor="val_loss", patience=2, restore_best_weights=True, start_from_round=1)
    history = trainer.fit(rounds=9, **FIT, callbacks=[Fake(), es])
    assert len(history.rounds) == 6 and es.stopped_round == 5
    assert es.best == 1.0 and es.best_round == 3
    assert trainer.server_state is states[3]

    es2 = EarlyStopping(monitor="loss", min_delta=10.0, patience=1, mode="min")
    history = make_trainer(data).fit(rounds=5, **FIT, callbacks=[es2])
    assert len(history.rounds) == 2  # no round improves loss by 10


def test_monitor_that_never_appears_warns_once(data):
    trainer = make_trainer(data)
    with pytest.warns(RuntimeWarning, match="val_acc") as record:
        trainer.fit(rounds=3, **FIT, callbacks=[EarlyStopping(monitor="val_acc")])
    assert len(record) == 1
    with pytest.warns(RuntimeWarning, match="not available") as record:
        make_trainer(data).fit(rounds=2, **FIT, callbacks=[ReduceLROnPlateau(monitor="nope")])
    assert len(record) == 1


def test_terminate_on_nan_stops_at_the_round_and_names_clients(data, capsys):
    trainer = make_trainer(data, injected_algo(client_lr=1e30))
    stop = TerminateOnNaN()
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        history = trainer.fit(rounds=10, **FIT, callbacks=[stop])
    r = stop.stopped_round
    assert r is not None and len(history.rounds) == r + 1
    assert not math.isfinite(history.history["loss"][-1])
    assert stop.bad_clients and set(stop.bad_clients) <= set(trainer.last_round_info["client_ids"])
    out = capsys.readouterr().out
    assert f"Round {r + 1}: invalid loss" in out and stop.bad_clients[0] in out


def test_csv_logger_handles_columns_that_appear_later(data, tmp_path):
    path = tmp_path / "log.csv"

    class Late(Callback):
        def on_round_end(self, round, logs=None):
            if round >= 2:
                logs["dp_epsilon"] = 0.5 * round

    trainer = make_trainer(data)
    history = trainer.fit(rounds=4, **FIT, validation_data=data, validation_freq=2,
                          callbacks=[Late(), CSVLogger(path), JSONLinesLogger(tmp_path / "log.jsonl")])
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["round"] for r in rows] == ["0", "1", "2", "3"]
    assert rows[0]["val_loss"] == "NA" and rows[0]["dp_epsilon"] == "NA"
    assert float(rows[1]["val_loss"]) == history.history["val_loss"][1]
    assert float(rows[3]["dp_epsilon"]) == 1.5
    assert [float(r["loss"]) for r in rows] == history.history["loss"]
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [0, 1, 2, 3]
    assert "val_loss" not in lines[0] and lines[1]["val_loss"] == history.history["val_loss"][1]


def test_csv_logger_append_drops_rounds_that_run_again(data, tmp_path):
    path = tmp_path / "log.csv"
    trainer = make_trainer(data)
    trainer.fit(rounds=3, **FIT, callbacks=[CSVLogger(path)])
    trainer.round = 2  # as if resumed from a checkpoint of round 2
    trainer.fit(rounds=4, **FIT, callbacks=[CSVLogger(path, append=True)])
    with open(path, newline="") as f:
        assert [r["round"] for r in csv.DictReader(f)] == ["0", "1", "2", "3"]


def test_tensorboard_event_files_hold_the_values(data, tmp_path):
    trainer = make_trainer(data)
    per_client = []

    class Clients(Callback):
        def on_client_results(self, round, client_ids, client_logs):
            per_client.append(client_logs)

    history = trainer.fit(rounds=4, **FIT, validation_data=data, validation_freq=2,
                          callbacks=[Clients(), TensorBoard(tmp_path / "tb", histogram_freq=2)])
    scalars = read_scalars(tmp_path / "tb")
    assert set(scalars) == {"train", "validation"}
    train, val = scalars["train"], scalars["validation"]
    assert [s for s, _ in train["loss"]] == [0, 1, 2, 3]  # step = round, 0-indexed
    np.testing.assert_allclose([v for _, v in train["loss"]], history.history["loss"], rtol=1e-6)
    np.testing.assert_allclose([v for _, v in train["accuracy"]], history.history["accuracy"], rtol=1e-6)
    assert [s for s, _ in val["loss"]] == [1, 3]
    np.testing.assert_allclose([v for _, v in val["loss"]], [history.history["val_loss"][i] for i in (1, 3)],
                               rtol=1e-6)
    assert "round_time" not in train
    histos = read_histograms(tmp_path / "tb")["train"]
    losses = histos["clients/loss"]
    assert [s for s, _ in losses] == [0, 1, 2, 3]
    h = losses[0][1]
    r0 = [c["loss"] for c in per_client[0]]
    assert h.num == 3 and h.min == pytest.approx(min(r0), rel=1e-6) and h.max == pytest.approx(max(r0), rel=1e-6)
    assert h.sum == pytest.approx(sum(r0), rel=1e-6)
    norms = histos["clients/update_norm"][0][1]
    assert norms.max == pytest.approx(max(c["update_norm"] for c in per_client[0]), rel=1e-6)
    assert [s for s, _ in histos["params/l1/kernel/value"]] == [1, 3]  # after every 2 completed rounds
    assert histos["params/l1/kernel/value"][0][1].num == 8 * 16
    # Hyperparameters are recorded (the HParams plugin's session start info).
    from fedtrain.logs.events import event_files, read_events

    plugins = {v.metadata.plugin_data.plugin_name for f in event_files(tmp_path / "tb") for e in read_events(f)
               for v in e.summary.value}
    assert "hparams" in plugins


def test_tensorboard_steps_and_csv_rounds_are_the_same_numbers(data, tmp_path):
    # One convention: the round of callbacks and History, the CSV's round column and the TensorBoard
    # step are all 0-indexed; an event file written by the callback is read back to check it.
    from fedtrain.logs.events import event_files, read_events
    from fedtrain.logs.runs import load_run

    trainer = make_trainer(data)
    seen = []
    history = trainer.fit(rounds=3, **FIT, validation_data=data, validation_freq=[2, 3], callbacks=[
        fedtrain.callbacks.LambdaCallback(on_round_end=lambda r, logs: seen.append(r)),
        CSVLogger(tmp_path / "run" / "metrics.csv"), TensorBoard(tmp_path / "run" / "tb")])
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    csv_rounds = [int(r["round"]) for r in rows]
    files = event_files(tmp_path / "run" / "tb" / "train")
    assert len(files) == 1
    steps = sorted({e.step for e in read_events(files[0]) for v in e.summary.value
                    if v.tag == "loss" and v.HasField("simple_value")})
    assert seen == history.rounds == csv_rounds == steps == [0, 1, 2]
    scalars = read_scalars(tmp_path / "run" / "tb")
    val_csv = [int(r["round"]) for r in rows if r["val_loss"] != "NA"]
    assert [s for s, _ in scalars["validation"]["loss"]] == val_csv == [1, 2]
    for step, value in scalars["train"]["loss"]:
        assert float(rows[step]["loss"]) == pytest.approx(value, rel=1e-6)
    assert load_run(tmp_path / "run" / "tb")[0] == load_run(tmp_path / "run")[0] == [0, 1, 2]


def test_tensorboard_without_client_histograms_does_not_fetch_client_results(data, tmp_path):
    trainer = make_trainer(data)
    cbs = fedtrain.callbacks.CallbackList([TensorBoard(tmp_path, client_histograms=False)], trainer, {})
    assert not cbs.wants("on_client_results")
    assert fedtrain.callbacks.CallbackList([TensorBoard(tmp_path)], trainer, {}).wants("on_client_results")


def test_history_plot_and_plot_run(data, tmp_path):
    pytest.importorskip("matplotlib")
    from fedtrain.logs import plots

    trainer = make_trainer(data)
    history = trainer.fit(rounds=3, **FIT, validation_data=data,
                          callbacks=[CSVLogger(tmp_path / "run" / "log.csv"), TensorBoard(tmp_path / "tb")])
    fig = history.plot(tmp_path / "h.png")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0] == "loss" and "accuracy" in titles and "round_time" not in titles
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plots.main([str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    rounds, curves = plots.load_run(tmp_path / "tb")
    assert rounds == [0, 1, 2] == history.rounds
    np.testing.assert_allclose(curves["val_loss"], history.history["val_loss"], rtol=1e-6)
    with pytest.raises(SystemExit):
        plots.main([str(tmp_path / "empty")])


def test_plot_has_integer_round_ticks_and_names_the_recipe(data, tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.ticker import MaxNLocator

    from fedtrain.logs import plots

    workdir = tmp_path / "shk"
    trainer = make_trainer(data)
    history = trainer.fit(rounds=3, **FIT, validation_data=data, callbacks=[CSVLogger(workdir / "metrics.csv")])
    (workdir / "fedtrain_run.json").write_text(json.dumps(
        {"recipe": "shakespeare_fedavg", "variant": "demo", "config": {}, "segments": []}))
    fig = plots.run_figure(workdir)
    assert fig._suptitle is not None and "shakespeare_fedavg:demo" in fig._suptitle.get_text()
    for ax in fig.axes:
        locator = ax.xaxis.get_major_locator()
        assert isinstance(locator, MaxNLocator) and locator._integer
        fig.canvas.draw()
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)
        assert list(ax.lines[0].get_xdata()) == history.rounds == [0, 1, 2]  # the logs' 0-indexed rounds
    out = plots.plot_run(workdir)
    assert out == workdir / "curves.png" and out.read_bytes()[:4] == b"\x89PNG"
    fig = history.plot()  # History.plot draws the same way
    assert all(isinstance(ax.xaxis.get_major_locator(), MaxNLocator) for ax in fig.axes)
    # Without a run record the title is the directory's name.
    (workdir / "fedtrain_run.json").unlink()
    assert plots.run_figure(workdir)._suptitle.get_text() == "shk"


def test_plots_without_matplotlib_give_a_clear_error(monkeypatch):
    import builtins

    from fedtrain.logs import plots

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"fedtrain\[plots\]"):
        plots.plot_curves([0], {"loss": [1.0]})


def test_importing_fedtrain_does_not_import_matplotlib():
    import subprocess
    import sys

    code = "import sys, fedtrain, fedtrain.logs; assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_parameter_overview_is_shown_when_verbose(data, capsys):
    make_trainer(data).fit(rounds=1, clients_per_round=2, batch_size=8, verbose=2)
    out = capsys.readouterr().out
    assert "l1/kernel" in out and "Total: 195" in out
    make_trainer(data).fit(rounds=1, clients_per_round=2, batch_size=8, verbose=0)
    assert "Total:" not in capsys.readouterr().out
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        import sys

        assert "tensorflow" not in sys.modules
