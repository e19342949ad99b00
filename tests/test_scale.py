"""Many devices and many processes give the single-device result (CPU devices forced by XLA flags)."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "scale_script.py")


def run(out, *args, timeout=300):
    proc = subprocess.run([sys.executable, SCRIPT, str(out), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(np.load(out))


def assert_same(a, b, tol=1e-5):
    leaves_a = [a[k] for k in sorted(k for k in a if k.startswith("arr_"))]
    leaves_b = [b[k] for k in sorted(k for k in b if k.startswith("arr_"))]
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(x, y, atol=tol, rtol=0)
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["fedavg", "scaffold", "mime"])
def test_four_devices_equal_one(tmp_path, algorithm):
    single = run(tmp_path / "single.npz", "--backend", "scan", "--algorithm", algorithm)
    sharded = run(tmp_path / "sharded.npz", "--devices", "4", "--algorithm", algorithm)
    assert str(sharded["backend"]) == "sharded" and int(sharded["devices"]) == 4  # auto picks it
    assert_same(single, sharded)
    alias = run(tmp_path / "pmap.npz", "--devices", "4", "--backend", "pmap", "--algorithm", algorithm)
    assert_same(sharded, alias, tol=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    single = run(tmp_path / "single.npz", "--backend", "scan", "--algorithm", "scaffold")
    port = str(_free_port())
    out = tmp_path / "multi.npz"
    procs = [subprocess.Popen([sys.executable, SCRIPT, str(out), "--devices", "2", "--algorithm", "scaffold",
                               "--num-processes", "2", "--process-id", str(i), "--port", port],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-4000:]
    multi = dict(np.load(out))
    assert int(multi["processes"]) == 2 and int(multi["devices"]) == 4 and str(multi["backend"]) == "sharded"
    assert_same(single, multi)
