"""The benchmark suite runs end to end with tiny sizes (no FedJAX) and writes its JSON and Markdown reports."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)


@pytest.mark.slow
def test_suite_tiny_without_fedjax_writes_json_and_markdown(tmp_path):
    output = tmp_path / "suite.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCH, "suite.py"), "--tiny", "--no-fedjax", "--rounds", "2",
         "--workloads", "emnist-10,stackoverflow-50", "--output", str(output)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["benchmark"] == "suite" and report["tiny"] and report["fedjax"] is False
    assert report["flags"]["stackoverflow"]["batch_size"] == 16
    rows = {(r["workload"], r["impl"]): r for r in report["results"]}
    assert set(rows) == {(w, i) for w in ("emnist-10", "stackoverflow-50") for i in ("fedtrain", "plain JAX")}
    for (workload, impl), row in rows.items():
        assert row["examples_per_s"] > 0 and row["s_per_round"] > 0 and row["first_round_s"] > 0
        assert row["compilations"] == 1, (workload, impl, row)
        assert row["peak_rss_mb"] > 0 and row["rounds"] == 2
    for workload in ("emnist-10", "stackoverflow-50"):
        ours = rows[(workload, "fedtrain")]
        assert 0 < ours["padding_efficiency"] <= 1
        assert ours["ratio_to_reference"] == pytest.approx(
            ours["examples_per_s"] / rows[(workload, "plain JAX")]["examples_per_s"])
        assert "ratio_to_fedjax" not in ours
    markdown = (tmp_path / "suite.md").read_text()
    assert "| stackoverflow-50 | fedtrain |" in markdown and "seq/s" in markdown


def test_unknown_workload_is_a_clear_error():
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "suite.py"), "--workloads", "mnist-7"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "unknown workloads ['mnist-7']" in proc.stderr


def test_synthetic_emnist_is_round_throughputs_data():
    import round_throughput
    import synthetic
    ours = round_throughput.synthetic_emnist(7, 10, 62)
    theirs = synthetic.emnist(7, 10, 62)
    assert list(ours.client_ids) == list(theirs)
    assert synthetic.fingerprint({c: dict(ours.get_client(c)) for c in ours.client_ids}) == \
        synthetic.fingerprint(theirs)


def test_synthetic_stackoverflow_shapes_and_npz_roundtrip(tmp_path):
    import synthetic
    clients = synthetic.stackoverflow(num_clients=50, vocab_size=100, median_size=10, max_size=30)
    sizes = np.array([len(c["x"]) for c in clients.values()])
    assert sizes.min() >= 1 and sizes.max() <= 30 and len(set(sizes)) > 5
    x = np.concatenate([c["x"] for c in clients.values()])
    y = np.concatenate([c["y"] for c in clients.values()])
    assert x.shape[1] == y.shape[1] == 20 and x.dtype == np.int32
    assert np.all(x[:, 0] == synthetic.BOS)
    np.testing.assert_array_equal(x[:, 1:][y[:, :-1] != synthetic.EOS], y[:, :-1][y[:, :-1] != synthetic.EOS])
    assert not np.any(x == synthetic.EOS) and np.any(y == synthetic.EOS) and y.max() == 103
    synthetic.save_npz(tmp_path / "so.npz", clients)
    back = synthetic.load_npz(tmp_path / "so.npz")
    assert list(back) == list(clients) and synthetic.fingerprint(back) == synthetic.fingerprint(clients)


def test_suite_passes_the_same_cohorts_and_flags_to_fedjax():
    import suite
    from fedtrain.samplers import UniformSampler
    assert suite.cohorts(30, 4, 2)[1] == [int(i) for i in UniformSampler().sample(0, 1, 30, 4)]
    assert {t: f["batch_size"] for t, f in suite.FLAGS.items()} == dict(emnist=10, shakespeare=10, stackoverflow=16,
                                                                          cifar100=20)
    assert suite.FLAGS["emnist"]["client_lr"] == 0.001 and suite.FLAGS["shakespeare"]["client_lr"] == 0.0316
