"""fedtrain's FedJAX SQLite files against FedJAX 0.0.17 itself, where its virtualenv exists.

``benchmarks/fedjax_env.sh`` creates the virtualenv (pinned FedJAX, JAX 0.4.23, numpy 1.26).
Skipped without it; tests/test_codec.py checks the same encoding rules without FedJAX.
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("fedjax_compat", os.path.join(ROOT, "benchmarks", "fedjax_compat.py"))
fedjax_compat = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fedjax_compat)


@pytest.mark.slow
def test_fedjax_reads_fedtrain_files_and_back(tmp_path):
    python = fedjax_compat.default_fedjax_python()
    if not os.path.exists(python):
        pytest.skip(f"no FedJAX virtualenv at {python} (benchmarks/fedjax_env.sh creates it)")
    output = tmp_path / "compat.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "fedjax_compat.py"), "--workdir",
                           str(tmp_path / "files"), "--output", str(output)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["fedjax_env"]["fedjax"] == "0.0.17" and report["ok"]
    assert set(report["checks"]) == {"fedjax_reads_fedtrain_file", "fedjax_decodes_fedtrain_msgpack",
                                     "msgpack_bytes_identical", "fedtrain_decodes_fedjax_msgpack",
                                     "fedtrain_reads_fedjax_file", "sqlite_rows_identical"}


def test_fixture_comparison_catches_differences():
    clients = fedjax_compat.fixture_clients()
    ex = clients[0][1]
    assert fedjax_compat.same(ex, dict(ex)) == []
    assert fedjax_compat.same(ex, {**ex, "text": ex["text"][::-1]}) == ["/text: bytes values differ"]
    assert fedjax_compat.same(ex["float32_f"], ex["float32_f"].astype("float64"))
    big = clients[-1][1]["x"]
    assert big.dtype.byteorder == ">" and fedjax_compat.same(big, big.astype("<f4")) == []
    assert fedjax_compat.same(3 + 4j, np.complex128(3 + 4j)) == []
