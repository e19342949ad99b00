"""On-disk stores: round trips between every format, lazy views, threads, bad files."""

import os
import sqlite3
import threading

import h5py
import numpy as np
import pytest

from fedtrain.data import (FedjaxSQLiteData, InMemoryFederatedData, StoreError, TFFHDF5Data, TFFSQLiteData,
                           UnknownClientError, convert, detect_format, open_store, write_store)
from fedtrain.data.tff_sqlite import write_tff_sqlite


def make_clients(n=6, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        m = int(rng.integers(1, 9))
        out[f"f{i:04d}_{i % 3:02d}"] = {
            "pixels": rng.random((m, 28, 28), dtype=np.float32),
            "label": rng.integers(0, 62, m).astype(np.int32),
            "snippets": np.array([f"line {j}\n".encode() for j in range(m)], dtype=object),
        }
    return out


@pytest.fixture(scope="module")
def clients():
    return make_clients()


FORMATS = {"fedjax-sqlite": "d.sqlite", "tff-sqlite": "d.tff.sqlite", "tff-hdf5": "d.h5", "npz": "d.npz"}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert list(a[k].ravel()) == list(b[k].ravel()) if a[k].dtype == object else np.array_equal(a[k], b[k])


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_round_trip(tmp_path, clients, fmt):
    path = write_store(clients, tmp_path / FORMATS[fmt], fmt)
    assert detect_format(path) == fmt
    data = open_store(path)
    assert sorted(data.client_ids) == sorted(clients)
    assert data.num_clients == len(clients)
    for cid, ex in clients.items():
        assert data.client_size(cid) == len(ex["label"])
        assert_same(data.get_client(cid), ex)


@pytest.mark.parametrize("src", list(FORMATS))
@pytest.mark.parametrize("dst", list(FORMATS))
def test_convert_between_all_formats(tmp_path, clients, src, dst):
    a = write_store(clients, tmp_path / ("in_" + FORMATS[src]), src)
    b = convert(a, tmp_path / ("out_" + FORMATS[dst]), dst)
    data = open_store(b)
    for cid, ex in clients.items():
        assert_same(data.get_client(cid), ex)


def test_fedjax_order_and_bytes_ids(tmp_path):
    path = str(tmp_path / "x.sqlite")
    write_store({"b": {"x": np.arange(2)}, "a": {"x": np.arange(3)}, "\udcff:raw": {"x": np.arange(1)}}, path)
    data = FedjaxSQLiteData(path)
    assert data.client_ids == ["b", "a", "\udcff:raw"]  # rowid order, as FedJAX
    con = sqlite3.connect(path)
    keys = [r[0] for r in con.execute("SELECT client_id FROM federated_data ORDER BY rowid")]
    con.close()
    assert keys == [b"b", b"a", b"\xff:raw"]
    assert data.client_size("\udcff:raw") == 1


def test_views_are_lazy_and_thread_safe(tmp_path, clients):
    path = write_store(clients, tmp_path / "d.sqlite")
    data = FedjaxSQLiteData(path)
    reads = []
    original = data._read

    def counting(cid):
        reads.append(cid)
        return original(cid)

    data._read = counting
    ids = data.client_ids[:3]
    sub = data.subset(ids).preprocess(lambda ex: {"x": 1 - ex["pixels"][..., None], "y": ex["label"]}, keeps_size=True)
    assert sub.client_ids == ids and sub.num_clients == 3
    assert [sub.client_size(c) for c in ids] == [len(clients[c]["label"]) for c in ids]
    assert reads == []  # sizes from metadata
    doubled = sub.preprocess(lambda ex: {k: np.concatenate([v, v]) for k, v in ex.items()})
    assert doubled.client_size(ids[0]) == 2 * len(clients[ids[0]]["label"])
    assert sub.get_client(ids[1])["x"].shape[1:] == (28, 28, 1)
    with pytest.raises(UnknownClientError, match="unknown client id 'nope'"):
        sub.get_client("nope")
    with pytest.raises(UnknownClientError):
        sub.get_client(data.client_ids[-1])  # outside the subset
    results, errors = {}, []

    def worker(cid):
        try:
            results[cid] = data.get_client(cid)["label"]
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(c,)) for c in data.client_ids]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and all(np.array_equal(results[c], clients[c]["label"]) for c in clients)
    data.close()


def test_tff_sqlite_feature_spec_and_splits(tmp_path, clients):
    path = str(tmp_path / "t.sqlite")
    test_part = {k: v for k, v in list(clients.items())[:2]}
    write_tff_sqlite({"train": clients, "test": test_part}, path)
    with pytest.raises(ValueError, match="pass split="):
        TFFSQLiteData(path)
    with pytest.raises(ValueError, match="no split 'dev'"):
        TFFSQLiteData(path, "dev")
    test = TFFSQLiteData(path, "test")
    assert test.num_clients == 2
    # Without fedtrain's feature table (a file written by TFF): flat features, TF dtypes, or a spec.
    con = sqlite3.connect(path)
    con.execute("DROP TABLE fedtrain_features")
    con.commit()
    con.close()
    cid = next(iter(clients))
    raw = TFFSQLiteData(path, "train").get_client(cid)
    assert raw["pixels"].shape == (len(clients[cid]["label"]), 784) and raw["pixels"].dtype == np.float32
    assert raw["label"].dtype == np.int64
    spec = TFFSQLiteData(path, "train", features={"pixels": ((28, 28), np.float32), "label": ((), np.int32)})
    assert_same(spec.get_client(cid), clients[cid])
    with pytest.raises(StoreError, match="does not fit shape"):
        TFFSQLiteData(path, "train", features={"pixels": ((27, 28), None)}).get_client(cid)


def test_hdf5_legacy_layout(tmp_path):
    path = str(tmp_path / "legacy.h5")
    with h5py.File(path, "w") as f:
        g = f.create_group("examples/writer_1")
        g["pixels"] = np.zeros((3, 28, 28), np.float32)
        g["label"] = np.arange(3, dtype=np.int32)
        f.create_group("examples/writer_2")["snippets"] = np.array([b"a", b"bb"], dtype=h5py.special_dtype(vlen=bytes))
    data = TFFHDF5Data(path)
    assert data.client_ids == ["writer_1", "writer_2"]
    assert data.client_sizes().tolist() == [3, 2]
    assert list(data.get_client("writer_2")["snippets"]) == [b"a", b"bb"]


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["fedjax-sqlite", "tff-hdf5"])
def test_truncated_and_corrupt_files(tmp_path, clients, fmt):
    path = write_store(make_clients(40), tmp_path / FORMATS[fmt], fmt)
    blob = open_bytes(path)
    trunc = tmp_path / ("trunc_" + FORMATS[fmt])
    trunc.write_bytes(blob[: len(blob) // 3])
    with pytest.raises(StoreError, match="corrupt or truncated"):
        data = open_store(trunc)
        for cid in data.client_ids:
            data.get_client(cid)
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"\x00" * 4096)
    with pytest.raises(StoreError, match="not a SQLite, HDF5 or npz"):
        open_store(garbage)
    with pytest.raises(StoreError, match="not a readable SQLite"):
        FedjaxSQLiteData(garbage)


def test_corrupt_blob_names_the_client(tmp_path, clients):
    path = write_store(clients, tmp_path / "d.sqlite")
    con = sqlite3.connect(path)
    con.execute("UPDATE federated_data SET data = ? WHERE client_id = ?", (b"junk", b"f0001_01"))
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="client 'f0001_01'.*corrupt"):
        FedjaxSQLiteData(path).get_client("f0001_01")


def test_wrong_schema(tmp_path, clients):
    path = str(tmp_path / "other.sqlite")
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE users (name TEXT)")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="neither FedJAX's table federated_data"):
        open_store(path)
    with pytest.raises(StoreError, match="not a FedJAX SQLite file"):
        FedjaxSQLiteData(path)
    tff = write_tff_sqlite({"train": clients}, tmp_path / "t.sqlite")
    with pytest.raises(StoreError, match="looks like a TFF file"):
        FedjaxSQLiteData(tff)
    fj = write_store(clients, tmp_path / "f.sqlite")
    with pytest.raises(StoreError, match="looks like a FedJAX file"):
        TFFSQLiteData(fj)
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f["pixels"] = np.zeros(3)
    with pytest.raises(StoreError, match="no group 'examples'"):
        TFFHDF5Data(tmp_path / "bad.h5")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_store(tmp_path / "missing.sqlite")


def test_ragged_and_wrong_dtype_on_write(tmp_path):
    ragged = {"c1": {"x": np.zeros((3, 2)), "y": np.zeros(4)}}
    for fmt, name in FORMATS.items():
        with pytest.raises(ValueError, match="client 'c1'.*different numbers of examples"):
            write_store(ragged, tmp_path / name, fmt)
        assert not os.path.exists(tmp_path / name) and not os.path.exists(tmp_path / (name + ".partial"))
    with pytest.raises(ValueError, match="fixed-width text"):
        write_store({"c": {"t": np.array(["a", "b"])}}, tmp_path / "t.sqlite")
    with pytest.raises(ValueError, match="written twice"):
        from fedtrain.data import FedjaxSQLiteWriter
        with FedjaxSQLiteWriter(tmp_path / "dup.sqlite") as w:
            w.add("a", {"x": np.zeros(1)})
            w.add("a", {"x": np.zeros(1)})
    path = write_store({"c": {"x": np.zeros(1)}}, tmp_path / "exists.sqlite")
    with pytest.raises(FileExistsError, match="overwrite"):
        write_store({"c": {"x": np.zeros(1)}}, path)


def test_ragged_tf_example_features(tmp_path):
    from fedtrain.data.tf_example import serialize_example
    path = str(tmp_path / "r.sqlite")
    write_tff_sqlite({"train": {"c": {"x": np.zeros((1, 2))}}}, path)
    con = sqlite3.connect(path)
    con.execute("INSERT INTO examples VALUES ('train', 'c', ?)", (serialize_example({"x": np.zeros(3)}),))
    con.execute("UPDATE client_metadata SET num_examples = 2")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="feature 'x' is ragged"):
        TFFSQLiteData(path).get_client("c")


def test_in_memory_is_a_store_too(clients):
    mem = InMemoryFederatedData(clients)
    assert detect_format  # all writers accept any FederatedData
    assert sorted(mem.client_ids) == sorted(clients)


def open_bytes(path):
    with open(path, "rb") as f:
        return f.read()


# -- npz: every feature kind, without pickle --------------------------------------------------


def test_npz_round_trips_every_feature_kind(tmp_path):
    from fedtrain.data import load_npz, save_npz
    ragged = np.empty(3, dtype=object)
    ragged[:] = [np.arange(2, dtype=np.int32), np.zeros(0, np.int32), np.arange(5, dtype=np.int32)]
    grid = np.empty((2, 2), dtype=object)
    grid[:] = [[b"a", "b"], [None, 7]]
    clients = {
        "plain": {"x": np.arange(6, dtype=np.float32).reshape(3, 2), "y": np.array([1, 2, 3], np.int64),
                  "flag": np.array([True, False, True]), "f16": np.ones((3, 1), np.float16),
                  "fortran": np.asfortranarray(np.arange(12.0).reshape(3, 4))},
        "text \u00e9\u4e2d \udcff": {"u": np.array(["one", "\u00e9t\u00e9", ""]), "s": np.array([b"a", b"\x00b", b""]),
                                     "tokens": np.array([b"\xff raw", b"", b"line\n"], dtype=object),
                                     "words": np.array(["x", "\u4e2d\u6587", ""], dtype=object)},
        "ragged": {"seq": ragged, "label": np.arange(3)},
        "grid": {"cells": grid},
    }
    path = save_npz(InMemoryFederatedData(clients), tmp_path / "all.npz")
    back = load_npz(path)
    assert back.client_ids == list(clients)
    for cid, ex in clients.items():
        got = back.get_client(cid)
        assert got.keys() == ex.keys()
        for k, v in ex.items():
            assert got[k].dtype == v.dtype and got[k].shape == v.shape, (cid, k)
            if v.dtype == object:
                for a, b in zip(got[k].ravel(), v.ravel()):
                    assert type(a) is type(b) and (np.array_equal(a, b) if isinstance(b, np.ndarray) else a == b)
            else:
                assert np.array_equal(got[k], v), (cid, k)
    import zipfile
    with zipfile.ZipFile(path) as z:  # plain arrays only: numpy reads every member with allow_pickle=False
        assert "__fedtrain__.npy" in z.namelist()
    with np.load(path, allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)
    with pytest.raises(ValueError, match="cannot be stored without pickle"):
        save_npz(InMemoryFederatedData({"c": {"o": np.array([object()], dtype=object)}}), tmp_path / "o.npz")


def test_npz_written_by_old_fedtrain_is_refused_with_the_fix(tmp_path):
    import zipfile
    path = tmp_path / "old.npz"
    with zipfile.ZipFile(path, "w") as z:  # what fedtrain 0.1 wrote: ids as an object array
        with z.open("__client_ids__.npy", "w") as f:
            np.save(f, np.array(["a"], dtype=object), allow_pickle=True)
        with z.open("0/x.npy", "w") as f:
            np.save(f, np.arange(3))
    with pytest.raises(StoreError, match=r"member __client_ids__ is a pickled object array; fedtrain never "
                                         r"unpickles files\. Re-write it with fedtrain >= 0\.2 "
                                         r"\(`fedtrain data convert`\)"):
        open_store(path)
    with zipfile.ZipFile(tmp_path / "plain_ids.npz", "w") as z:  # a string-array id list reads fine
        with z.open("__client_ids__.npy", "w") as f:
            np.save(f, np.array(["a", "b"]))
        for i in range(2):
            with z.open(f"{i}/x.npy", "w") as f:
                np.save(f, np.arange(i + 1))
    assert open_store(tmp_path / "plain_ids.npz").client_sizes().tolist() == [1, 2]
