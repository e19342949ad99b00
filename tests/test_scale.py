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


def _launch_two(out, extra_per_process, timeout=300):
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, SCRIPT, str(out), "--devices", "2", "--num-processes", "2",
                               "--process-id", str(i), "--port", port, *extra_per_process[i]],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for i in range(2)]
    results = []
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        results.append((p.returncode, err))
    return results


@pytest.mark.slow
def test_processes_with_different_settings_fail_clearly(tmp_path):
    results = _launch_two(tmp_path / "x.npz", [["--seed", "3"], ["--seed", "4"]])
    for code, err in results:
        assert code != 0
        assert "started with different settings" in err, err[-2000:]


def test_unreachable_coordinator_names_the_address(tmp_path):
    port = _free_port()  # nothing listens there
    proc = subprocess.run([sys.executable, SCRIPT, str(tmp_path / "x.npz"), "--num-processes", "2",
                           "--process-id", "1", "--port", str(port), "--timeout", "3"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0
    assert f"127.0.0.1:{port}" in proc.stderr and "process 0 is running" in proc.stderr, proc.stderr[-2000:]


def test_uneven_cohort_over_devices_warns_once(tmp_path):
    code = (
        "import os, warnings\n"
        "os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'\n"
        "import optax, fedtrain\n"
        "from flax import nnx\n"
        "from tests.conftest import TinyMLP, make_clients\n"
        "data = fedtrain.InMemoryFederatedData(make_clients(num_clients=8))\n"
        "t = fedtrain.FederatedTrainer(TinyMLP(rngs=nnx.Rngs(0)), data, fedtrain.algorithms.fedavg(optax.sgd(0.1)))\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    t.fit(rounds=2, clients_per_round=3, batch_size=4, verbose=0)\n"
        "msgs = [str(x.message) for x in w if 'padded with empty slots' in str(x.message)]\n"
        "assert t.backend == 'sharded' and len(msgs) == 1, msgs\n"
        "print('OK')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
