"""Every example in examples/ runs with tiny settings."""

import importlib
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
sys.path.insert(0, EXAMPLES)


def example(name):
    return importlib.import_module(name)


def test_quickstart():
    results = example("quickstart").main(["--rounds", "2", "--clients", "20"])
    assert math.isfinite(results["loss"]) and 0 <= results["accuracy"] <= 1


def test_custom_callback(tmp_path):
    log = example("custom_callback").main(["--rounds", "2", "--log", str(tmp_path / "r.jsonl")])
    with open(log) as f:
        lines = f.read().splitlines()
    assert len(lines) == 2 and '"round": 2' in lines[1]


def test_resume_checkpoint(tmp_path):
    out = example("resume_checkpoint").main(["--rounds", "4", "--stop-after", "2",
                                             "--checkpoint-dir", str(tmp_path / "ckpt")])
    assert out["rounds"] == 4 and out["identical"]


def test_numpy_partition():
    results = example("numpy_partition").main(["--rounds", "5", "--num-clients", "20"])
    assert results["accuracy"] > 0.5


def test_dp_fedavg():
    out = example("dp_fedavg").main(["--rounds", "2", "--clients-per-round", "5"])
    assert 0 < out["epsilon"] < math.inf


def test_scaffold_vs_fedavg():
    out = example("scaffold_vs_fedavg").main(["--rounds", "3"])
    assert set(out) == {"fedavg", "scaffold"} and all(math.isfinite(r["loss"]) for r in out.values())


def test_multi_device_subprocess():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run([sys.executable, os.path.join(EXAMPLES, "multi_device.py"), "--rounds", "2"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "4 devices" in result.stdout and "backend sharded: round 2" in result.stdout
    diff = float(result.stdout.split("sharded vs one device: ")[1].split()[0])
    assert diff < 1e-5
