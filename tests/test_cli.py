"""`fedtrain train/eval/plot/recipes` run in subprocesses: training, resume, and the error cases."""

import csv
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "emnist_fedavg:tiny"


def fedtrain(*args, cwd=ROOT, env=None):
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, "-m", "fedtrain.cli", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=300)


def rounds_in(workdir):
    with open(os.path.join(workdir, "metrics.csv"), newline="") as f:
        return [int(r["round"]) for r in csv.DictReader(f)]


@pytest.mark.parametrize("command", [[], ["train"], ["eval"], ["plot"], ["recipes"], ["data"]])
def test_help(command):
    result = fedtrain(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: fedtrain" in result.stdout


def test_recipes_lists_the_grid():
    result = fedtrain("recipes", "-v")
    assert result.returncode == 0, result.stderr
    assert "shakespeare_fedavg" in result.stdout and "cifar100_fedyogi" in result.stdout
    assert "_common" not in result.stdout and "tiny" in result.stdout


def test_train_resume_eval_plot(tmp_path):
    workdir = tmp_path / "run"
    result = fedtrain("train", TINY, "--workdir", workdir, "--config.rounds=2", "--progress", "line")
    assert result.returncode == 0, result.stderr
    assert "Round 2/2" in result.stdout and "Evaluated" in result.stdout  # the final test evaluation
    for name in ("metrics.csv", "results.json", "fedtrain_run.json", "checkpoints", "tensorboard"):
        assert (workdir / name).exists(), name
    assert rounds_in(workdir) == [0, 1]
    # Rerunning with more rounds continues from the checkpoint of round 2.
    result = fedtrain("train", TINY, "--workdir", workdir, "--config.rounds", "3", "--progress", "none")
    assert result.returncode == 0, result.stderr
    assert "resuming emnist_fedavg" in result.stdout
    assert rounds_in(workdir) == [0, 1, 2]
    assert json.loads((workdir / "results.json").read_text())["rounds"] == 3

    result = fedtrain("eval", workdir, "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)  # stdout is the result alone; the evaluation's progress goes to stderr
    assert out["round"] == 3 and 0.0 <= out["accuracy"] <= 1.0
    assert "Evaluated" in result.stderr and "examples in" in result.stderr

    result = fedtrain("plot", workdir)
    assert result.returncode == 0, result.stderr
    assert (workdir / "curves.png").stat().st_size > 1000


def test_recipe_by_path_and_different_recipe_refused(tmp_path):
    workdir = tmp_path / "run"
    path = os.path.join(ROOT, "recipes", "emnist_fedavgm.py")
    result = fedtrain("train", f"{path}:tiny", "--workdir", workdir, "--config.rounds=1", "--progress=none",
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    result = fedtrain("train", TINY, "--workdir", workdir, "--config.rounds=2", "--progress=none")
    assert result.returncode != 0
    assert "refusing to resume" in result.stderr and "emnist_fedavgm" in result.stderr
    result = fedtrain("train", f"{path}:tiny", "--workdir", workdir, "--config.rounds=2",
                      "--config.model.kind=dense", "--progress=none")
    assert result.returncode != 0 and "config.model" in result.stderr


def test_config_key_typo_suggests(tmp_path):
    result = fedtrain("train", TINY, "--workdir", tmp_path / "w", "--config.clients_per_rond=2")
    assert result.returncode == 2
    assert "unknown config key 'config.clients_per_rond'" in result.stderr
    assert "did you mean config.clients_per_round" in result.stderr.lower()
    result = fedtrain("train", TINY, "--workdir", tmp_path / "w", "--config.data.sorce=x")
    assert result.returncode == 2 and "config.data.source" in result.stderr
    result = fedtrain("train", TINY, "--workdir", tmp_path / "w", "--config.rounds=two")
    assert result.returncode == 2 and "config.rounds" in result.stderr


def test_unknown_recipe_and_variant(tmp_path):
    result = fedtrain("train", "emnist_fedavgg", "--workdir", tmp_path / "w")
    assert result.returncode == 2
    assert "unknown recipe 'emnist_fedavgg'" in result.stderr and "emnist_fedavg" in result.stderr
    result = fedtrain("train", "emnist_fedavg:nope", "--workdir", tmp_path / "w")
    assert result.returncode == 2 and "unknown variant 'nope'" in result.stderr
    result = fedtrain("eval", tmp_path / "nothing")
    assert result.returncode == 2 and "fedtrain_run.json" in result.stderr


def test_missing_dataset_offline_names_file(tmp_path):
    # An empty cache and no route to the download host: the error names the file and its URL.
    env = {"FEDTRAIN_DATA_DIR": str(tmp_path / "cache"), "http_proxy": "http://127.0.0.1:9",
           "https_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
           "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}
    result = fedtrain("train", "emnist_fedavg", "--workdir", tmp_path / "w", "--config.rounds=1", env=env)
    assert result.returncode == 2
    assert "federated_emnist_train.sqlite" in result.stderr
    assert "https://storage.googleapis.com/gresearch/fedjax/emnist/" in result.stderr
    assert str(tmp_path / "cache") in result.stderr


def train_here(workdir, *extra):
    from fedtrain.cli import main

    return main(["train", TINY, "--workdir", str(workdir), "--progress", "none", *extra])


def segments(workdir):
    return json.loads((workdir / "fedtrain_run.json").read_text())["segments"]


def test_changed_config_is_refused_then_kept_as_a_new_segment(tmp_path, capsys):
    w = tmp_path / "run"
    assert train_here(w, "--config.rounds=1") == 0
    assert [s["start_round"] for s in segments(w)] == [0]
    before = (w / "fedtrain_run.json").read_text()
    capsys.readouterr()
    changed = ["--config.client_learning_rate=0.5", "--config.batch_size=4"]
    assert train_here(w, "--config.rounds=2", *changed) == 2
    err = capsys.readouterr().err
    assert "refusing to resume" in err and "--allow-config-change" in err
    assert "config.client_learning_rate: 0.1 -> 0.5" in err and "config.batch_size: 20 -> 4" in err
    assert "config.rounds: 1 -> 2" not in err  # a run-length key, not a refused change
    assert (w / "fedtrain_run.json").read_text() == before and rounds_in(w) == [0]

    assert train_here(w, "--config.rounds=2", *changed, "--allow-config-change") == 0
    out = capsys.readouterr().out
    assert "resuming emnist_fedavg" in out and "config.client_learning_rate: 0.1 -> 0.5" in out
    record = json.loads((w / "fedtrain_run.json").read_text())
    first, second = record["segments"]
    assert (first["start_round"], second["start_round"]) == (0, 1)
    assert first["config"]["client_learning_rate"] == 0.1 and first["config"]["rounds"] == 1
    assert second["config"]["client_learning_rate"] == 0.5 and second["changes"]["batch_size"] == [20, 4]
    assert first["started"] and second["started"] and record["config"] == second["config"]
    assert rounds_in(w) == [0, 1]

    # Training longer needs no flag; rerunning the same config adds no segment.
    assert train_here(w, "--config.rounds=3", *changed) == 0
    assert train_here(w, "--config.rounds=3", *changed) == 0
    segs = segments(w)
    assert [s["start_round"] for s in segs] == [0, 1, 2] and segs[2]["changes"] == {"rounds": [2, 3]}
    assert rounds_in(w) == [0, 1, 2]
    capsys.readouterr()
    # Going back to the first learning rate is a change too; the identity keys never change.
    assert train_here(w, "--config.rounds=3", "--config.batch_size=4") == 2
    assert "config.client_learning_rate: 0.5 -> 0.1" in capsys.readouterr().err
    assert train_here(w, "--config.rounds=4", *changed, "--config.seed=1", "--allow-config-change") == 2
    assert "config.seed=0" in capsys.readouterr().err and len(segments(w)) == 3


def test_run_record_without_segments_is_continued(tmp_path, capsys):
    w = tmp_path / "run"
    assert train_here(w, "--config.rounds=1") == 0
    record = json.loads((w / "fedtrain_run.json").read_text())
    old_config = record["config"]
    del record["segments"]  # a record written before segments existed
    (w / "fedtrain_run.json").write_text(json.dumps(record))
    assert train_here(w, "--config.rounds=2") == 0
    segs = segments(w)
    assert [s["start_round"] for s in segs] == [0, 1]
    assert segs[0]["config"] == old_config and segs[1]["changes"] == {"rounds": [1, 2]}


def test_train_help_names_the_flag_and_the_run_length_keys(capsys):
    from fedtrain.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--allow-config-change" in text
    assert "run-length keys (rounds, checkpoint_every, validation_freq, validation_batch_size)" in text


def one_line_error(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Errno" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("command", ["train", "eval", "plot"])
def test_workdir_that_is_a_file_gives_one_line(tmp_path, capsys, command):
    from fedtrain.cli import main

    f = tmp_path / "run"
    f.write_text("not a directory\n")
    args = {"train": ["train", TINY, "--workdir", str(f), "--progress", "none"], "eval": ["eval", str(f)],
            "plot": ["plot", str(f)]}[command]
    assert main(args) == 2
    err = one_line_error(capsys)
    assert f"{f} is a file" in err and "--workdir" in err


def write_metrics(workdir):
    workdir.mkdir()
    (workdir / "metrics.csv").write_text("round,loss\n0,2.0\n1,1.5\n")


def read_only_cases(tmp_path):
    """(argv, the read-only directory) for `fedtrain train` into a read-only workdir, into a new workdir
    inside a read-only directory, and `fedtrain plot` of a read-only workdir."""
    existing = tmp_path / "existing"
    existing.mkdir()
    parent = tmp_path / "parent"
    parent.mkdir()
    plotted = tmp_path / "plotted"
    write_metrics(plotted)
    return [(["train", TINY, "--workdir", str(existing), "--progress", "none"], existing),
            (["train", TINY, "--workdir", str(parent / "new"), "--progress", "none"], parent),
            (["plot", str(plotted)], plotted)]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_workdir_gives_one_line(tmp_path, capsys):
    from fedtrain.cli import main

    for argv, ro in read_only_cases(tmp_path):
        ro.chmod(0o500)
        try:
            assert main(argv) == 2, argv
        finally:
            ro.chmod(0o700)
        err = one_line_error(capsys)
        assert str(ro) in err and "not writable" in err and "chmod u+w" in err


def test_read_only_workdir_gives_one_line_when_access_says_so(tmp_path, capsys, monkeypatch):
    """The same paths as above, with os.access reporting the directory read-only (as for a non-root user)."""
    from fedtrain.cli import main

    real_access = os.access
    for argv, ro in read_only_cases(tmp_path):
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: (os.fspath(p) != str(ro) and real_access(p, mode)))
        assert main(argv) == 2, argv
        err = one_line_error(capsys)
        assert str(ro) in err and "not writable" in err and "chmod u+w" in err
    monkeypatch.setattr(os, "access", real_access)


def test_write_refused_by_the_filesystem_gives_one_line(tmp_path, capsys, monkeypatch):
    """A workdir that passes the access check but refuses the write (e.g. a read-only mount)."""
    import builtins

    from fedtrain.cli import main

    workdir = tmp_path / "run"
    workdir.mkdir()
    real_open = builtins.open

    def refusing_open(file, mode="r", *args, **kwargs):
        if any(m in mode for m in "wax") and str(workdir) in os.fspath(file):
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    assert main(["train", TINY, "--workdir", str(workdir), "--progress", "none"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert str(workdir) in err and "Permission denied" in err and "chmod u+w" in err and "[Errno" not in err


def test_train_with_every_checkpoint_damaged_stops_unless_restart_if_unreadable(tmp_path):
    """Every step of a workdir damaged (an edited metadata checksum, metadata that no longer parses, a
    deleted metadata file): `fedtrain train` stops with one error naming the steps and
    --restart-if-unreadable, renaming nothing; with the flag the steps are set aside as <step>.corrupt and
    training runs from round 0 to the end."""
    train = ["train", TINY, "--workdir", "run", "--config.rounds=3", "--config.checkpoint_every=1",
             "--progress", "none"]
    first = fedtrain(*train, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    ckpt = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["1", "2", "3"]
    meta_path = ckpt / "3" / "metadata" / "metadata"
    meta = json.loads(meta_path.read_text())
    meta["checksum"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    broken = ckpt / "2" / "metadata" / "metadata"
    broken.write_text(broken.read_text()[:-20])
    (ckpt / "1" / "metadata" / "metadata").unlink()

    refused = fedtrain(*train, cwd=tmp_path)
    assert refused.returncode != 0
    err = [line for line in refused.stderr.splitlines() if line.startswith("fedtrain: error:")]
    assert len(err) == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert "every step is damaged (steps tried: 3, 2, 1)" in err[0] and "--restart-if-unreadable" in err[0]
    assert sorted(p.name for p in ckpt.iterdir()) == ["1", "2", "3"]  # nothing renamed

    restarted = fedtrain(*train, "--restart-if-unreadable", cwd=tmp_path, env={"PYTHONWARNINGS": "default"})
    assert restarted.returncode == 0, restarted.stderr
    assert "training starts over from round 0" in restarted.stderr
    assert sorted(p.name for p in ckpt.iterdir()) == ["1", "1.corrupt", "2", "2.corrupt", "3", "3.corrupt"]
    assert rounds_in(tmp_path / "run") == [0, 1, 2]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["rounds"] == 3
