"""Crashes while the logs are written: CSVLogger, JSONLinesLogger and the run record lose at most the row
being written, and a rerun continues the file."""

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The child logs rounds START..39 and kills itself with SIGKILL on the first write to the KILL_AT-th file it
# opens for writing (0: never), i.e. in the middle of writing the whole file.
CHILD = textwrap.dedent("""
    import builtins, os, signal, sys

    kind, path, start, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    opened = [0]
    real_open = builtins.open

    class Killing:
        def __init__(self, f):
            self._f = f
        def write(self, text):
            os.kill(os.getpid(), signal.SIGKILL)
        def __getattr__(self, name):
            return getattr(self._f, name)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self._f.close()

    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if "w" in mode:
            opened[0] += 1
            if opened[0] == kill_at:
                return Killing(f)
        return f

    from fedtrain.callbacks import CSVLogger, JSONLinesLogger

    builtins.open = fake_open
    log = CSVLogger(path, append=True) if kind == "csv" else JSONLinesLogger(path, append=True)
    log.on_train_begin()
    for r in range(start, 40):
        logs = {"loss": float(r)}
        if r % 10 == 9:
            logs[f"m{r}"] = 1.0  # a new column: the CSV is rewritten with the wider header
        log.on_round_end(r, logs)
        print(r, flush=True)
    log.on_train_end()
""")


def child(tmp_path, kind, path, start, kill_at=0, **kw):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, str(script), kind, str(path), str(start), str(kill_at)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def jsonl_rounds(path):
    return [json.loads(line)["round"] for line in path.read_text().splitlines()]


def test_csv_kill_during_header_rewrite_keeps_rows_and_rerun_continues(tmp_path):
    path = tmp_path / "metrics.csv"
    # Whole-file writes: #1 the empty file at the start, #2 the header of round 0, #3/#4 new columns at
    # rounds 9 and 19, #5 at round 29.
    proc = child(tmp_path, "csv", path, 0, kill_at=5)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err
    assert out.split()[-1] == "28"
    rows = csv_rows(path)
    assert [int(r["round"]) for r in rows] == list(range(29))  # only round 29, being written, is lost
    assert [float(r["loss"]) for r in rows] == [float(r) for r in range(29)]
    proc = child(tmp_path, "csv", path, 29)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    rows = csv_rows(path)
    assert [int(r["round"]) for r in rows] == list(range(40))
    assert rows[5]["m19"] == "NA" and rows[29]["m29"] == "1.0" and rows[39]["m39"] == "1.0"


def test_jsonl_kill_during_resume_rewrite_keeps_rows_and_rerun_continues(tmp_path):
    path = tmp_path / "log.jsonl"
    proc = child(tmp_path, "jsonl", path, 0)
    assert proc.communicate(timeout=120) and proc.returncode == 0
    assert jsonl_rounds(path) == list(range(40))
    # Resuming from round 10 rewrites the file without rounds 10..; a kill in that rewrite keeps the old file.
    proc = child(tmp_path, "jsonl", path, 10, kill_at=1)
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert jsonl_rounds(path) == list(range(40))
    proc = child(tmp_path, "jsonl", path, 10)
    proc.communicate(timeout=120)
    assert proc.returncode == 0 and jsonl_rounds(path) == list(range(40))


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_kill_at_a_random_moment_loses_at_most_the_row_being_written(tmp_path, kind):
    path = tmp_path / ("metrics.csv" if kind == "csv" else "log.jsonl")
    for delay in (0.0, 0.003, 0.01):
        path.unlink(missing_ok=True)
        proc = child(tmp_path, kind, path, 0)
        printed = []
        for line in proc.stdout:
            printed.append(int(line))
            if len(printed) == 20:
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=60)
        proc.stdout.close()
        proc.stderr.close()
        rounds = [int(r["round"]) for r in csv_rows(path)] if kind == "csv" else jsonl_rounds(path)
        assert rounds == list(range(len(rounds))) and len(rounds) >= printed[-1] + 1
        start = len(rounds)
        proc = child(tmp_path, kind, path, start)
        proc.communicate(timeout=120)
        rounds = [int(r["round"]) for r in csv_rows(path)] if kind == "csv" else jsonl_rounds(path)
        assert proc.returncode == 0 and rounds == list(range(40))


def test_csv_crash_midway_through_a_rewrite_keeps_the_file(tmp_path, monkeypatch):
    from fedtrain.callbacks import CSVLogger

    path = tmp_path / "metrics.csv"
    log = CSVLogger(path)
    log.on_train_begin()
    for r in range(10):
        log.on_round_end(r, {"loss": float(r)})
    before = path.read_bytes()
    real = csv.DictWriter.writerow
    calls = []

    def failing(self, row):
        calls.append(row)
        if len(calls) == 4:
            raise OSError(28, "No space left on device")
        return real(self, row)

    monkeypatch.setattr(csv.DictWriter, "writerow", failing)
    with pytest.raises(OSError):
        log.on_round_end(10, {"loss": 10.0, "val_loss": 1.0})  # a new column: the whole file is rewritten
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert not [p for p in os.listdir(tmp_path) if p != "metrics.csv"]  # no temporary file left behind
    log = CSVLogger(path, append=True)
    log.on_train_begin()
    log.on_round_end(10, {"loss": 10.0, "val_loss": 1.0})
    log.on_train_end()
    assert [int(r["round"]) for r in csv_rows(path)] == list(range(11))


def test_run_record_is_fsynced_before_it_is_swapped_in(tmp_path, monkeypatch):
    from fedtrain.logs.runs import RUN_RECORD, read_run_record, write_run_record

    write_run_record(tmp_path, {"recipe": "r", "config": {"a": 1}})
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])

    def crashing_replace(src, dst):
        events.append("replace")
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", crashing_replace)
    with pytest.raises(OSError):
        write_run_record(tmp_path, {"recipe": "r", "config": {"a": 2}})
    monkeypatch.setattr(os, "replace", real_replace)
    assert events[:2] == ["fsync", "replace"]
    assert read_run_record(tmp_path)["config"] == {"a": 1}  # the old record, whole
    assert os.listdir(tmp_path) == [RUN_RECORD]


@pytest.mark.parametrize("command", ["train", "eval"])
def test_corrupt_run_record_names_the_file_and_the_fix(tmp_path, capsys, command):
    from fedtrain.cli import main

    w = tmp_path / "run"
    w.mkdir()
    (w / "fedtrain_run.json").write_text('{"recipe": "emnist_fedavg", "conf')  # cut short
    args = ["train", "emnist_fedavg:tiny", "--workdir", str(w)] if command == "train" else ["eval", str(w)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(w / "fedtrain_run.json") in err and "corrupt" in err and "--workdir" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
