"""The README's demo runs end to end (tiny settings) and reports finite results."""

import importlib.util
import math
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shakespeare_demo_tiny(capsys):
    demo = load_example("shakespeare_fedavg")
    results = demo.main(["--rounds", "2", "--clients-per-round", "3", "--hidden-size", "16",
                         "--max-test-clients", "20", "--verbose", "2"])
    out = capsys.readouterr().out
    assert "federated Shakespeare: 1154 train clients, 20 test clients" in out
    assert "Round 2/2" in out and "test accuracy" in out
    assert math.isfinite(results["loss"]) and 0.0 <= results["accuracy"] <= 1.0
    assert 0.1 < results["baseline_accuracy"] < 0.3  # the space character
