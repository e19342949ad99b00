"""scripts/learning_curves.py: the summary and PNG of long runs, from real metrics.csv files."""

import csv
import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "learning_curves.py"


def load_script():
    spec = importlib.util.spec_from_file_location("learning_curves", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(path: Path, accuracies: dict[int, float]):
    path.mkdir()
    with open(path / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["round", "loss", "round_time", "val_accuracy"])
        for r in range(10):
            w.writerow([r, 1.0 / (r + 1), 0.5, accuracies.get(r, "NA")])


def test_summary_and_png(tmp_path):
    write_run(tmp_path / "a", {4: 0.3, 9: 0.5})
    write_run(tmp_path / "b", {4: 0.4, 9: 0.35})
    out = tmp_path / "curves.png"
    assert load_script().main([f"A={tmp_path / 'a'}", f"B={tmp_path / 'b'}", "--reference", "0.569",
                               "--window", "2", "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["A"]["rounds"] == 10 and summary["A"]["train_seconds"] == 5.0
    assert summary["A"]["last_val_accuracy"] == 0.5 and summary["A"]["last_round_with_val_accuracy"] == 10
    assert summary["B"]["best_val_accuracy"] == 0.4
    assert summary["B"]["mean_val_accuracy_last_2_points"] == pytest.approx(0.375)


def test_run_without_validation_is_a_clear_error(tmp_path):
    write_run(tmp_path / "a", {})
    with pytest.raises(ValueError, match="validation_freq"):
        load_script().main([f"A={tmp_path / 'a'}", "-o", str(tmp_path / "x.png")])
