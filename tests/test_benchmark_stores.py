"""The store benchmark runs end to end (tiny population) and writes a complete JSON report."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_data_stores_tiny_writes_json_and_table(tmp_path):
    output = tmp_path / "stores.json"
    workdir = tmp_path / "files"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "data_stores.py"), "--tiny", "--workdir", str(workdir),
         "--output", str(output)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| fedjax-sqlite |" in proc.stdout and "| tff-hdf5 |" in proc.stdout
    report = json.loads(output.read_text())
    assert report["mode"] == "tiny" and report["machine"]["cpu_count"] >= 1
    pop = report["population"]
    assert pop["num_clients"] == 24 and pop["num_examples"] > 24
    assert report["targets"] == {"peak_rss_above_baseline_mb": 500, "assembly_fraction": 0.1}
    assert set(report["stores"]) == {"fedjax-sqlite", "tff-hdf5"} == set(report["met"])
    for name, store in report["stores"].items():
        assert (workdir / {"fedjax-sqlite": "emnist_train.sqlite", "tff-hdf5": "fed_emnist_train.h5"}[name]).exists()
        assert store["file_mb"] > 0 and store["write_s"] > 0
        it = store["iterate"]
        assert (it["clients"], it["examples"]) == (pop["num_clients"], pop["num_examples"])
        assert it["clients_per_s"] > 0 and it["examples_per_s"] > it["clients_per_s"]
        assert 0 <= it["peak_rss_above_baseline_mb"] < 500 and it["baseline_rss_mb"] > 0
        rd = store["round"]
        assert rd["rounds"] == pop["rounds"] and rd["round_s"] > 0 and rd["assembly_s"] > 0
        assert rd["assembly_fraction"] == pytest.approx(rd["assembly_s"] / rd["round_s"])
        assert rd["examples_per_round"] > 0
    # One compilation serves both stores: same population, same shapes.
    assert report["stores"]["tff-hdf5"]["round"]["new_compilations"] == 0
