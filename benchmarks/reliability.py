"""Reliability figures: kill -9 at random moments then resume, damaged checkpoints, fault-injection tests.

``python benchmarks/reliability.py [--trials N] [--seed S] [--no-pytest]`` prints a table and writes
``benchmarks/results/reliability.json``. Every run is a real process of ``tests.resume_script`` (a stateful
FedOpt model, 12 rounds, a checkpoint every 2 rounds, 2 kept) writing real orbax checkpoints:

* kill trials: SIGKILL after a random delay (startup, a round, a save in flight), then rerun to the end;
  the final server and client state must equal an uninterrupted run's bit for bit;
* corruption cases: the newest step (round 6) of a run is damaged one way, then the run is resumed;
* fault-injection tests: ``tests/test_checkpoint_faults.py``, ``tests/test_resume.py`` and
  ``tests/test_interrupts.py`` under pytest, passed / total.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "PYTHONWARNINGS": "default"}
FAULT_TESTS = ["tests/test_checkpoint_faults.py", "tests/test_resume.py", "tests/test_interrupts.py"]


def script(ckpt: Path, out: Path, *args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tests.resume_script", str(ckpt), str(out), *map(str, args)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def same_state(a: Path, b: Path) -> bool:
    if not (Path(f"{a}.npz").exists() and Path(f"{b}.npz").exists()):
        return False
    x, y = np.load(f"{a}.npz"), np.load(f"{b}.npz")
    return sorted(x.files) == sorted(y.files) and all(
        x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]) for k in x.files)


def steps(ckpt: Path) -> list[int]:
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


def kill_trial(work: Path, delay: float, ref: Path) -> dict:
    ckpt, out = work / "ckpt", work / "out"
    proc = subprocess.Popen([sys.executable, "-m", "tests.resume_script", str(ckpt), str(out)], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    on_disk = steps(ckpt)
    tmp = sorted(p.name for p in ckpt.iterdir() if "tmp" in p.name) if ckpt.is_dir() else []
    resumed = script(ckpt, out)
    return {"delay_s": round(delay, 2), "killed": killed, "steps_after_kill": on_disk, "tmp_dirs_after_kill": tmp,
            "resume_rc": resumed.returncode, "exact": resumed.returncode == 0 and same_state(ref, out)}


def damage_truncate_array(step: Path) -> None:
    f = max((p for p in (step / "server_state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def damage_delete_array(step: Path) -> None:
    max((p for p in (step / "server_state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size).unlink()


def damage_metadata_json(step: Path) -> None:
    f = step / "metadata" / "metadata"
    f.write_text(f.read_text()[:-20])


def damage_checksum(step: Path) -> None:
    f = step / "metadata" / "metadata"
    meta = json.loads(f.read_text())
    meta["checksum"] = "0" * 64
    f.write_text(json.dumps(meta))


def damage_round(step: Path) -> None:
    f = step / "metadata" / "metadata"
    meta = json.loads(f.read_text())
    meta["round"] = int(meta["round"]) + 1
    f.write_text(json.dumps(meta))


NEWEST = {"truncated array file": damage_truncate_array, "deleted array file": damage_delete_array,
          "metadata JSON cut short": damage_metadata_json, "checksum mismatch": damage_checksum,
          "edited round number": damage_round}


def corruption_case(name: str, base: Path, work: Path, ref: Path) -> dict:
    ckpt, out = work / "ckpt", work / "out"
    shutil.copytree(base, ckpt)
    every = name.startswith("every step")
    for s in (steps(ckpt) if every else steps(ckpt)[-1:]):
        (damage_checksum if every else NEWEST[name])(ckpt / str(s))
    before = steps(ckpt)
    args = ["--on-unreadable", "restart"] if name.endswith("with restart") else []
    proc = script(ckpt, out, *args)
    after = sorted(p.name for p in ckpt.iterdir())
    exact = proc.returncode == 0 and same_state(ref, out)
    warned = [line for line in proc.stderr.splitlines() if "is unreadable" in line or "no readable" in line]
    if name == "every step damaged, no restart":
        ok = proc.returncode == 1 and "every step is damaged" in proc.stderr and steps(ckpt) == before
        outcome = ("stopped with an error naming the steps, nothing renamed" if ok
                   else f"rc {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]} ")
    elif name == "every step damaged, with restart":
        ok = exact and all(f"{s}.corrupt" in after for s in before)
        outcome = "set aside as <step>.corrupt, trained from round 0, bit-exact" if ok else f"rc {proc.returncode}"
    else:
        ok = exact and f"{before[-1]}.corrupt" in after and bool(warned)
        outcome = (f"step {before[-1]} skipped with a warning, resumed from {before[-2]}, bit-exact" if ok else
                   f"rc {proc.returncode}: " + (proc.stderr.strip().splitlines() or [""])[-1][:200])
    return {"case": name, "ok": ok, "outcome": outcome, "steps_before": before, "entries_after": after}


def fault_tests(work: Path) -> dict:
    xml = work / "faults.xml"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pytest", "-n", "0", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                    *FAULT_TESTS], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=1800)
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, failures = int(suite.get("tests")), int(suite.get("failures")) + int(suite.get("errors"))
    skipped = int(suite.get("skipped"))
    return {"files": FAULT_TESTS, "total": total, "passed": total - failures - skipped, "failed": failures,
            "skipped": skipped, "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=10, help="kill -9 trials (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-pytest", action="store_true", help="skip the fault-injection test count")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reliability.json"))
    a = p.parse_args(argv)
    rng = random.Random(a.seed)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedtrain-reliability-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        ref_run = script(tmp / "ref" / "ckpt", tmp / "ref" / "out")
        if ref_run.returncode:
            print(ref_run.stderr[-3000:], file=sys.stderr)
            return 1
        ref, duration = tmp / "ref" / "out", time.perf_counter() - t0
        trials = []
        for i in range(a.trials):
            trials.append(kill_trial(tmp / f"kill{i}", rng.uniform(0.5, duration), ref))
            print(f"kill trial {i + 1}/{a.trials}: {trials[-1]}", flush=True)
        base = tmp / "six" / "ckpt"
        six = script(base, tmp / "six" / "out", "--rounds", 6)
        assert six.returncode == 0, six.stderr[-3000:]
        names = [*NEWEST, "every step damaged, no restart", "every step damaged, with restart"]
        cases = []
        for i, name in enumerate(names):
            cases.append(corruption_case(name, base, tmp / f"case{i}", ref))
            print(f"corruption case: {cases[-1]['case']}: {cases[-1]['outcome']}", flush=True)
        faults = None if a.no_pytest else fault_tests(tmp)
    killed = [t for t in trials if t["killed"]]
    result = {
        "machine": f"{platform.node()}, {os.cpu_count()} CPUs", "python": platform.python_version(),
        "uninterrupted_run_s": round(duration, 1),
        "kill_trials": {"total": len(trials), "killed": len(killed), "exact": sum(t["exact"] for t in trials),
                        "exact_of_killed": sum(t["exact"] for t in killed), "trials": trials},
        "corruption_cases": {"total": len(cases), "ok": sum(c["ok"] for c in cases), "cases": cases},
        "fault_injection_tests": faults, "seconds": round(time.perf_counter() - t_start, 1)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(f"{'measure':44s} result")
    print(f"{'kill -9 trials, bit-exact after resume':44s} {result['kill_trials']['exact']} / {len(trials)} "
          f"({len(killed)} killed before the end)")
    for c in cases:
        print(f"{'  ' + c['case']:44s} {'ok' if c['ok'] else 'FAILED'}: {c['outcome']}")
    print(f"{'corruption cases as documented':44s} {result['corruption_cases']['ok']} / {len(cases)}")
    if faults:
        print(f"{'fault-injection tests passed':44s} {faults['passed']} / {faults['total']} "
              f"({faults['skipped']} skipped)")
    print(f"wrote {a.out} ({result['seconds']:.0f} s)")
    return 0 if result["kill_trials"]["exact"] == len(trials) and result["corruption_cases"]["ok"] == len(cases) \
        else 1


if __name__ == "__main__":
    sys.exit(main())
