"""Relative paths everywhere: checkpoints, ``trainer.restore`` and every CLI command that takes a path, run
from a working directory that is not the repository's."""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from fedtrain.callbacks import ModelCheckpoint, OrbaxCheckpoint
from fedtrain.checkpoint_format import latest_step, restore_latest
from fedtrain.cli import main
from tests.resume_script import make_trainer

FIT = dict(clients_per_round=4, batch_size=8, verbose=0)
TINY = "emnist_fedavg:tiny"


def entries(d):
    return sorted(p.name for p in d.iterdir())


def test_checkpoint_and_restore_with_relative_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = make_trainer()
    trainer.fit(rounds=2, **FIT, callbacks=[OrbaxCheckpoint("ckpt", async_save=False)])
    assert entries(tmp_path / "ckpt") == ["1", "2"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "unreadable checkpoint" warning for a healthy checkpoint
        assert make_trainer().restore("ckpt") == 2
        assert make_trainer().restore("ckpt", step=1) == 1
        (tmp_path / "elsewhere").mkdir()
        monkeypatch.chdir(tmp_path / "elsewhere")
        assert make_trainer().restore(os.path.join("..", "ckpt")) == 2
        assert restore_latest(make_trainer(), "../ckpt", set_aside=True)["round"] == 2
        assert latest_step("../ckpt") == 2
        # The callback resumes from a relative directory too, and continues it.
        again = make_trainer()
        again.fit(rounds=3, **FIT, callbacks=[ModelCheckpoint("../ckpt", async_save=False)])
    assert again.round == 3 and again.history.rounds == [0, 1, 2]
    assert entries(tmp_path / "ckpt") == ["1", "2", "3"]  # nothing renamed *.corrupt


def _train(workdir, *extra, rounds=1):
    return main(["train", TINY, "--workdir", workdir, f"--config.rounds={rounds}", "--progress", "none", *extra])


def test_cli_commands_with_relative_paths(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    assert _train("runs/shk") == 0
    assert _train("runs/shk", rounds=2) == 0
    out = capsys.readouterr().out
    assert "resuming emnist_fedavg" in out and "(round 1)" in out
    assert entries(tmp_path / "runs" / "shk" / "checkpoints") == ["1", "2"]
    assert main(["eval", "runs/shk", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["round"] == 2, captured.err
    assert "unreadable" not in captured.err
    monkeypatch.chdir(tmp_path / "runs")
    assert main(["eval", "shk"]) == 0 and "at round 2" in capsys.readouterr().out
    assert main(["plot", "shk"]) == 0
    assert (tmp_path / "runs" / "shk" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["plot", "shk", "-o", "figs/curves.png"]) == 0
    assert (tmp_path / "runs" / "figs" / "curves.png").stat().st_size > 1000
    monkeypatch.chdir(tmp_path / "runs" / "shk")
    assert main(["plot", "."]) == 0
    assert entries(tmp_path / "runs" / "shk" / "checkpoints") == ["1", "2"]


def test_data_commands_with_relative_paths(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    os.makedirs("raw")
    np.savez("raw/arrays.npz", x=rng.normal(size=(60, 3)).astype(np.float32), y=rng.integers(0, 3, 60))
    assert main(["data", "partition", "raw/arrays.npz", "stores/part.sqlite", "--method", "iid",
                 "--num-clients", "4"]) == 0
    assert main(["data", "convert", "stores/part.sqlite", "stores/part.h5"]) == 0
    assert main(["data", "convert", "stores/part.h5", "stores/part.npz"]) == 0
    capsys.readouterr()
    for name in ("part.sqlite", "part.h5", "part.npz"):
        assert main(["data", "inspect", f"stores/{name}", "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["num_clients"] == 4 and info["num_examples"] == 60, name
    if pytest.importorskip("matplotlib"):
        assert main(["data", "inspect", "stores/part.sqlite", "--histogram", "figs/sizes.png"]) == 0
        assert (tmp_path / "figs" / "sizes.png").read_bytes()[:4] == b"\x89PNG"


def test_python_m_fedtrain_outside_the_repository(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}

    def fedtrain(*args):
        return subprocess.run([sys.executable, "-m", "fedtrain", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)

    result = fedtrain("train", TINY, "--workdir", "runs/shk", "--config.rounds=1", "--progress", "none")
    assert result.returncode == 0, result.stderr
    result = fedtrain("eval", "runs/shk", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["round"] == 1
    assert "unreadable" not in result.stderr
    assert entries(tmp_path / "runs" / "shk" / "checkpoints") == ["1"]
