"""Nothing is lost: real processes are SIGKILLed mid-run and rerun; the result is bitwise identical."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(*args, expect_kill=False, expect_error=False):
    env = dict(os.environ, PYTHONWARNINGS="default", XLA_PYTHON_CLIENT_PREALLOCATE="false")
    proc = subprocess.run([sys.executable, "-m", "tests.resume_script", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    if expect_kill:
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    elif expect_error:
        assert proc.returncode == 1, proc.stderr[-3000:]
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def assert_same_run(ref: Path, other: Path):
    a, b = np.load(f"{ref}.npz"), np.load(f"{other}.npz")
    assert sorted(a.files) == sorted(b.files)
    assert any(k.startswith("client_") for k in a.files)
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k, strict=True)
    ha, hb = json.loads(Path(f"{ref}.json").read_text()), json.loads(Path(f"{other}.json").read_text())
    assert ha["rounds"] == hb["rounds"] == list(range(12))
    assert ha["history"].keys() == hb["history"].keys()
    for k in ha["history"]:
        np.testing.assert_array_equal(np.asarray(ha["history"][k]), np.asarray(hb["history"][k]), err_msg=k)
    # The CSV log was continued, not duplicated.
    rows = Path(f"{other}.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == [str(i) for i in range(12)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("reference")
    run(d / "ckpt", d / "out")
    return d / "out"


def test_sigkill_mid_run_then_rerun_is_bitwise_identical(reference, tmp_path):
    run(tmp_path / "ckpt", tmp_path / "out", "--kill-at", 7, expect_kill=True)
    steps = sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit())
    assert steps and max(steps) <= 7
    proc = run(tmp_path / "ckpt", tmp_path / "out")
    assert "done 12" in proc.stdout
    assert_same_run(reference, tmp_path / "out")


def test_sigkill_while_a_save_is_in_flight(reference, tmp_path):
    run(tmp_path / "ckpt", tmp_path / "out", "--kill-in-save", 8, expect_kill=True)
    run(tmp_path / "ckpt", tmp_path / "out")
    assert_same_run(reference, tmp_path / "out")
    # Unfinished temporary directories were cleaned up; only max_to_keep steps remain.
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["10", "12"]


def test_corrupt_or_truncated_newest_checkpoint_falls_back(reference, tmp_path):
    run(tmp_path / "ckpt", tmp_path / "out", "--kill-at", 9, expect_kill=True)
    ckpt = tmp_path / "ckpt"
    # Let any in-flight write be: keep only finished steps, then damage the newest.
    steps = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    newest = ckpt / str(steps[-1])
    data_files = sorted(p for p in (newest / "server_state").rglob("*") if p.is_file() and p.stat().st_size > 0)
    biggest = max(data_files, key=lambda p: p.stat().st_size)
    blob = biggest.read_bytes()
    biggest.write_bytes(blob[: len(blob) // 2])
    proc = run(ckpt, tmp_path / "out")
    assert f"checkpoint {newest} is unreadable" in proc.stderr
    assert_same_run(reference, tmp_path / "out")
    assert (ckpt / f"{steps[-1]}.corrupt").is_dir()


def test_altered_bytes_are_caught_by_the_checksum(reference, tmp_path):
    run(tmp_path / "ckpt", tmp_path / "out", "--rounds", 6)
    ckpt = tmp_path / "ckpt"
    meta_path = ckpt / "6" / "metadata" / "metadata"
    meta = json.loads(meta_path.read_text())
    meta["checksum"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    shutil.rmtree(ckpt / "4", ignore_errors=True)
    proc = run(ckpt, tmp_path / "out", expect_error=True)
    assert "do not match the checksum" in proc.stderr and "every step is damaged" in proc.stderr
    assert (ckpt / "6").is_dir()  # nothing renamed without an explicit choice
    # Starting over is an explicit choice; the run then still ends identically.
    proc = run(ckpt, tmp_path / "out", "--on-unreadable", "restart")
    assert_same_run(reference, tmp_path / "out")
