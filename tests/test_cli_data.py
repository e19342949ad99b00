"""``fedtrain data inspect|convert|partition``."""

import json
import os
import subprocess
import sys

import numpy as np

from fedtrain.cli import main
from fedtrain.data import open_store, write_store


def clients():
    return {f"c{i}": {"x": np.full((i + 1, 3), i, np.float32), "y": np.arange(i + 1, dtype=np.int32)} for i in range(5)}


def test_inspect_and_histogram(tmp_path, capsys):
    path = write_store(clients(), tmp_path / "d.sqlite")
    assert main(["data", "inspect", path, "--histogram", str(tmp_path / "h.png")]) == 0
    out = capsys.readouterr().out
    assert "fedjax-sqlite" in out and "clients:  5" in out and "examples: 15" in out
    assert "feature x: shape [N, 3] dtype float32" in out and "p50=3" in out
    assert os.path.getsize(tmp_path / "h.png") > 1000
    assert main(["data", "info", path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_clients"] == 5 and info["features"]["y"] == {"shape": [], "dtype": "int32"}


def test_convert_round_trip(tmp_path, capsys):
    src = write_store(clients(), tmp_path / "d.sqlite")
    assert main(["data", "convert", src, str(tmp_path / "d.h5")]) == 0
    assert main(["data", "convert", str(tmp_path / "d.h5"), str(tmp_path / "t.sqlite"), "--format", "tff-sqlite",
                 "--split", "train"]) == 0
    assert main(["data", "convert", str(tmp_path / "t.sqlite"), str(tmp_path / "back.sqlite")]) == 0
    assert "wrote" in capsys.readouterr().out
    back = open_store(tmp_path / "back.sqlite")
    assert np.array_equal(back.get_client("c3")["x"], clients()["c3"]["x"])
    assert main(["data", "convert", src, str(tmp_path / "d.h5")]) == 2  # exists
    assert "already exists" in capsys.readouterr().err


def test_partition(tmp_path, capsys):
    np.savez(tmp_path / "central.npz", x=np.random.default_rng(0).random((200, 4)), y=np.repeat(np.arange(10), 20))
    assert main(["data", "partition", str(tmp_path / "central.npz"), str(tmp_path / "p.sqlite"), "--method",
                 "shards", "--num-clients", "10"]) == 0
    assert "clients=10 examples=200" in capsys.readouterr().out
    data = open_store(tmp_path / "p.sqlite")
    assert all(len(np.unique(data.get_client(c)["y"])) <= 2 for c in data.client_ids)
    assert main(["data", "partition", str(tmp_path / "central.npz"), str(tmp_path / "q.sqlite"),
                 "--num-clients", "500", "--method", "iid"]) == 2
    assert "only 200 examples" in capsys.readouterr().err


def test_console_script_and_errors(tmp_path):
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"hello" * 100)
    proc = subprocess.run([sys.executable, "-m", "fedtrain.cli", "data", "inspect", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not a SQLite, HDF5 or npz file" in proc.stderr
