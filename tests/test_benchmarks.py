"""The throughput benchmark runs end to end (tiny sizes) and writes a complete JSON report."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_round_throughput_tiny_writes_json_and_table(tmp_path):
    output = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "round_throughput.py"), "--tiny",
         "--workloads", "emnist-10,shakespeare-10", "--output", str(output)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| emnist-10 | fedtrain |" in proc.stdout and "| shakespeare-10 | plain JAX |" in proc.stdout
    report = json.loads(output.read_text())
    assert report["machine"]["cpu_count"] >= 1
    rows = {(r["workload"], r["impl"]): r for r in report["results"]}
    assert set(rows) == {(w, i) for w in ("emnist-10", "shakespeare-10") for i in ("fedtrain", "plain JAX")}
    for (workload, impl), row in rows.items():
        assert row["examples_per_s"] > 0 and row["s_per_round"] > 0 and row["first_round_s"] > 0
        assert row["compilations"] == 1, (workload, impl, row)
        assert row["peak_rss_mb"] > 0
    for workload in ("emnist-10", "shakespeare-10"):
        ours = rows[(workload, "fedtrain")]
        assert 0 < ours["padding_efficiency"] <= 1
        assert 0 <= ours["input_wait_fraction"] < 1
        assert ours["ratio_to_reference"] == pytest.approx(
            ours["examples_per_s"] / rows[(workload, "plain JAX")]["examples_per_s"])


def test_unknown_workload_is_a_clear_error():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "round_throughput.py"),
                           "--workloads", "mnist-7"], capture_output=True, text=True)
    assert proc.returncode != 0 and "unknown workloads ['mnist-7']" in proc.stderr


@pytest.mark.slow
def test_memory_scaling_tiny_writes_json(tmp_path):
    output = tmp_path / "memory.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "memory_scaling.py"), "--tiny",
                           "--output", str(output)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(output.read_text())["results"]
    assert [(r["population"], r["cohort"]) for r in rows] == [(200, 5), (2000, 5)]
    for r in rows:
        assert 5 <= r["client_state_rows"] <= 15  # one host row per client seen in 3 rounds of 5
        assert r["peak_rss_mb"] > r["baseline_rss_mb"] > 0
