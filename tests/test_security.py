"""Crafted files never run code or allocate what they merely declare.

Each pickle payload here would create a marker folder when unpickled; every test
checks that the marker is still absent after fedtrain refused the file.
"""

import io
import json
import os
import pickle
import re
import sqlite3
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import h5py
import msgpack
import numpy as np
import pytest

from fedtrain.cli import main
from fedtrain.data import (FedjaxSQLiteData, StoreError, TFFHDF5Data, TFFSQLiteData, convert, load_npz, open_store,
                           write_store)
from fedtrain.data.convert import load_npz_arrays
from fedtrain.data.tf_example import ExampleParseError, parse_example
from fedtrain.data.tff_sqlite import write_tff_sqlite

PACKAGE = Path(__file__).resolve().parents[1] / "fedtrain"


class MakeMarker:
    """Unpickling this calls ``os.mkdir(path)``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def pickled_npy(marker) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([MakeMarker(marker)], dtype=object), allow_pickle=True)
    return buf.getvalue()


def plain_npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def old_format_npz(path, marker):
    """An npz as fedtrain < 0.2 wrote it, with the id list replaced by a payload."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("__client_ids__.npy", pickled_npy(marker))
        z.writestr("0/x.npy", plain_npy(np.arange(3)))
    return path


def new_format_npz(path, marker):
    """A current-format npz (valid header) whose feature member is a payload."""
    header = {"format": "fedtrain-npz", "version": 2, "client_ids": ["c"], "encoded": {}}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("__fedtrain__.npy", plain_npy(np.frombuffer(json.dumps(header).encode(), np.uint8)))
        z.writestr("0/x.npy", pickled_npy(marker))
    return path


@pytest.fixture
def marker(tmp_path):
    m = tmp_path / "PWNED"
    yield m
    assert not m.exists(), "a crafted file ran code"


@pytest.mark.parametrize("craft", [old_format_npz, new_format_npz])
def test_payload_is_live(tmp_path, craft):
    """The crafted files do run code under a pickle-enabled reader, so the tests below test something."""
    m = tmp_path / "live"
    path = craft(tmp_path / "evil.npz", m)
    with np.load(path, allow_pickle=True) as z:
        [z[k] for k in z.files]
    assert m.exists()


READERS = {
    "open_store": lambda p: open_store(p),
    "load_npz": lambda p: load_npz(p),
    "load_npz_arrays": lambda p: load_npz_arrays(p),
    "convert": lambda p: convert(p, str(p) + ".sqlite"),
}


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("craft,member", [(old_format_npz, "__client_ids__"), (new_format_npz, "0/x")])
def test_pickled_npz_member_is_refused(tmp_path, marker, reader, craft, member):
    path = craft(tmp_path / "evil.npz", marker)
    with pytest.raises(StoreError, match=rf"member {re.escape(member)} is a pickled object array; fedtrain never "
                                         r"unpickles files\. Re-write it with fedtrain >= 0\.2"):
        READERS[reader](path)


@pytest.mark.parametrize("craft", [old_format_npz, new_format_npz])
def test_cli_inspect_refuses_pickled_npz(tmp_path, marker, capsys, craft):
    path = craft(tmp_path / "evil.npz", marker)
    assert main(["data", "inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert "is a pickled object array" in err and "fedtrain never unpickles files" in err
    assert main(["data", "convert", str(path), str(tmp_path / "out.sqlite")]) == 2
    assert not (tmp_path / "out.sqlite").exists()


def test_cli_inspect_subprocess(tmp_path, marker):
    path = old_format_npz(tmp_path / "evil.npz", marker)
    proc = subprocess.run([sys.executable, "-m", "fedtrain.cli", "data", "inspect", str(path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "member __client_ids__ is a pickled object array" in proc.stderr


def test_raw_pickle_file_is_not_a_store(tmp_path, marker):
    path = tmp_path / "evil.npz"
    path.write_bytes(pickle.dumps(MakeMarker(marker)))
    with pytest.raises(StoreError, match="not a SQLite, HDF5 or npz"):
        open_store(path)
    with pytest.raises(StoreError, match="not a readable npz"):
        load_npz(path)


# -- npz: declared shapes against actual sizes --------------------------------------------------


def npy_header(shape, descr="<f8") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def test_npz_declared_shape_must_match_its_bytes(tmp_path, monkeypatch):
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("__fedtrain__.npy", npy_header((10**12,)) + b"\x00" * 64)
    allocated = []
    real_empty = np.empty
    monkeypatch.setattr(np, "empty", lambda *a, **k: allocated.append(a) or real_empty(*a, **k))
    with pytest.raises(StoreError, match=r"declares shape \(1000000000000,\) of float64 \(8000000000000 bytes\) but "
                                         r"holds 64 bytes"):
        load_npz(path)
    assert allocated == []  # refused before allocating anything


def test_npz_member_claiming_more_than_the_archive_holds(tmp_path):
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("0/x.npy", plain_npy(np.zeros(1000)))
    raw = bytearray(path.read_bytes())
    cd = raw.index(b"PK\x01\x02")
    struct.pack_into("<I", raw, cd + 24, 0xFFFFFF00)  # central directory: uncompressed size ~4 GB
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="which the archive cannot hold"):
        load_npz(path)


def test_npz_bad_header_and_blobs(tmp_path):
    def npz(members):
        p = tmp_path / f"f{len(list(tmp_path.iterdir()))}.npz"
        with zipfile.ZipFile(p, "w") as z:
            for name, data in members.items():
                z.writestr(name, data)
        return p

    def header(**kw):
        h = {"format": "fedtrain-npz", "version": 2, "client_ids": ["c"], "encoded": {}, **kw}
        return plain_npy(np.frombuffer(json.dumps(h).encode(), np.uint8))

    with pytest.raises(StoreError, match="not fedtrain's JSON header"):
        load_npz(npz({"__fedtrain__.npy": plain_npy(np.frombuffer(b"{not json", np.uint8))}))
    with pytest.raises(StoreError, match="version 3"):
        load_npz(npz({"__fedtrain__.npy": header(version=3)}))
    with pytest.raises(StoreError, match="not <client index>/<feature>"):
        load_npz(npz({"__fedtrain__.npy": header(), "7/x.npy": plain_npy(np.arange(2))}))
    with pytest.raises(StoreError, match="not an .npy array"):
        load_npz(npz({"__fedtrain__.npy": header(), "evil.pkl": pickle.dumps(1)}))
    with pytest.raises(StoreError, match="0/x.*corrupt"):
        load_npz(npz({"__fedtrain__.npy": header(encoded={"0/x": "msgpack-object"}),
                      "0/x.npy": plain_npy(np.frombuffer(b"\xc1junk", np.uint8))}))
    with pytest.raises(StoreError, match="marked 'pickle'"):
        load_npz(npz({"__fedtrain__.npy": header(encoded={"0/x": "pickle"}),
                      "0/x.npy": plain_npy(np.frombuffer(pickle.dumps([1]), np.uint8))}))


# -- FedJAX SQLite: msgpack extensions ----------------------------------------------------------


def fedjax_file(path, blob, num_examples=2):
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE federated_data (client_id BLOB NOT NULL PRIMARY KEY, data BLOB NOT NULL, "
                "num_examples INTEGER NOT NULL)")
    con.execute("INSERT INTO federated_data VALUES (?, ?, ?)", (b"c", blob, num_examples))
    con.commit()
    con.close()
    return path


def ext_ndarray(shape, dtype, buffer):
    return msgpack.ExtType(1, msgpack.packb((shape, dtype, buffer), use_bin_type=True))


@pytest.mark.parametrize("value,match", [
    (lambda m: ext_ndarray([2], "O", pickle.dumps(MakeMarker(m))), "holds Python objects"),
    (lambda m: ext_ndarray([2], "object", b"\x00" * 16), "holds Python objects"),
    (lambda m: ext_ndarray([10**12], "float64", b"\x00" * 16), r"declares shape \(1000000000000,\)"),
    (lambda m: ext_ndarray([-1], "float64", b"\x00" * 16), "not a list of non-negative ints"),
    (lambda m: msgpack.ExtType(4, msgpack.packb(([2], [b"a", pickle.dumps(MakeMarker(m)), 5]))),
     "must hold a list of bytes"),
    (lambda m: msgpack.ExtType(4, msgpack.packb(([10**9], [b"a", b"b"]))),
     "holds 1000000000 items but the data holds 2"),
])
def test_fedjax_extensions_never_build_objects_or_trust_shapes(tmp_path, marker, value, match):
    blob = zlib.compress(msgpack.packb({"x": value(marker)}))
    data = FedjaxSQLiteData(fedjax_file(tmp_path / "f.sqlite", blob))
    with pytest.raises(StoreError, match=match):
        data.get_client("c")


def test_fedjax_num_examples_is_checked(tmp_path):
    from fedtrain.data.codec import encode_examples
    blob = encode_examples({"x": np.arange(3)})
    with pytest.raises(StoreError, match="holds 3 examples but its num_examples column says 5"):
        FedjaxSQLiteData(fedjax_file(tmp_path / "a.sqlite", blob, 5)).get_client("c")
    with pytest.raises(StoreError, match="num_examples -1"):
        FedjaxSQLiteData(fedjax_file(tmp_path / "b.sqlite", blob, -1))


# -- TFF SQLite: tf.Example lengths, stored feature table ---------------------------------------


def delimited(field, payload):
    from fedtrain.data.tf_example import _delimited
    return _delimited(field, payload)


def example_with(feature: bytes) -> bytes:
    return delimited(1, delimited(1, delimited(1, b"x") + delimited(2, feature)))


@pytest.mark.parametrize("blob,match", [
    (b"\x0a\xff\xff\xff\xff\x0f" + b"\x00" * 8, "runs past the end"),  # declares ~4 GB, holds 8 bytes
    (example_with(delimited(2, delimited(1, b"\x00" * 5))), "float_list value with wire type 2 and 5 bytes"),
    (example_with(delimited(3, b"\x0d\x00\x00\x00\x00")), "int64_list value with wire type 5"),
    (example_with(delimited(3, delimited(1, b"\x80" * 11 + b"\x01"))), "longer than 10 bytes"),
    (example_with(delimited(2, b"\x08\x01")), "float_list value with wire type 0"),
])
def test_tf_example_declared_lengths_and_wire_types(blob, match):
    with pytest.raises(ExampleParseError, match=match):
        parse_example(blob)


def test_tff_stored_feature_table_and_counts_are_checked(tmp_path):
    clients = {"c": {"x": np.zeros((2, 3), np.float32)}}
    for dtype, shape, match in [("O", "[3]", "dtype 'O' is not numeric"),
                                ("float32", "__import__('os')", "invalid"),
                                ("float32", "[-3]", "not a JSON list of non-negative ints"),
                                ("V8", "[3]", "not numeric")]:
        path = write_tff_sqlite({"train": clients}, tmp_path / f"t{len(list(tmp_path.iterdir()))}.sqlite")
        con = sqlite3.connect(path)
        con.execute("UPDATE fedtrain_features SET dtype = ?, shape = ?", (dtype, shape))
        con.commit()
        con.close()
        with pytest.raises(StoreError, match=match):
            TFFSQLiteData(path)
    path = write_tff_sqlite({"train": clients}, tmp_path / "count.sqlite")
    con = sqlite3.connect(path)
    con.execute("UPDATE client_metadata SET num_examples = 10")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="gives client 'c' 10 examples but the examples table holds 2"):
        TFFSQLiteData(path).get_client("c")


# -- HDF5: links, references, external data, declared shapes --------------------------------------


def h5_with(path, build):
    with h5py.File(path, "w") as f:
        build(f.create_group("examples/c"), f, path.parent)
    return path


def external_storage(g, f, folder):
    (folder / "secret.bin").write_bytes(b"ab")
    g.create_dataset("x", shape=(2,), dtype="u1", external=[(str(folder / "secret.bin"), 0, 2)])


HDF5_CASES = {
    "reference": (lambda g, f, _: g.create_dataset("x", data=np.array([f["examples"].ref] * 2), dtype=h5py.ref_dtype),
                  "references or objects"),
    "soft link": (lambda g, f, _: (f.create_dataset("elsewhere", data=np.arange(2)),
                                   g.__setitem__("x", h5py.SoftLink("/elsewhere"))), "is a soft link"),
    "external link": (lambda g, f, folder: g.__setitem__("x", h5py.ExternalLink(str(folder / "other.h5"), "/d")),
                      "is an external link"),
    "external storage": (external_storage, "keeps its data in other files"),
    "huge declared shape": (lambda g, f, _: g.create_dataset("x", shape=(10**10,), dtype="f8", chunks=(1024,)),
                            r"declares shape \(10000000000,\) \(80000000000 bytes\) but the file stores 0 bytes"),
}


@pytest.mark.parametrize("case", list(HDF5_CASES))
def test_hdf5_refuses_what_reads_elsewhere_or_allocates_blindly(tmp_path, case):
    build, match = HDF5_CASES[case]
    data = TFFHDF5Data(h5_with(tmp_path / "x.h5", build))
    with pytest.raises(StoreError, match=match):
        data.client_size("c")
    with pytest.raises(StoreError, match=match):
        data.get_client("c")


def test_hdf5_client_group_link_and_plain_vlen_features(tmp_path):
    path = tmp_path / "l.h5"
    with h5py.File(path, "w") as f:
        f.create_group("real")["x"] = np.arange(2)
        f["examples/c"] = h5py.SoftLink("/real")
        g = f.create_group("examples/ok")
        g.create_dataset("text", data=np.array([b"a", b"bcd"], dtype=object), dtype=h5py.string_dtype("ascii"))
        seq = g.create_dataset("seq", shape=(2,), dtype=h5py.vlen_dtype(np.int32))
        seq[0], seq[1] = np.arange(3, dtype=np.int32), np.arange(1, dtype=np.int32)
        g.create_dataset("z", data=np.zeros((2, 1000)), compression="gzip")  # compresses well: still read
    data = TFFHDF5Data(path)
    with pytest.raises(StoreError, match="is a soft link"):
        data.get_client("c")
    ok = data.get_client("ok")
    assert list(ok["text"]) == [b"a", b"bcd"] and [list(s) for s in ok["seq"]] == [[0, 1, 2], [0]]
    assert ok["z"].shape == (2, 1000) and data.client_size("ok") == 2


# -- checkpoints ---------------------------------------------------------------------------------


def test_checkpoint_metadata_is_json_only(tmp_path, marker):
    from fedtrain.checkpoint_format import CheckpointError, _read_metadata
    (tmp_path / "3" / "metadata").mkdir(parents=True)
    (tmp_path / "3" / "metadata" / "metadata").write_bytes(pickle.dumps(MakeMarker(marker)))
    with pytest.raises((ValueError, CheckpointError)):
        _read_metadata(tmp_path / "3")


def test_orbax_restore_of_an_arbitrary_tree_does_not_unpickle(tmp_path, monkeypatch):
    """fedtrain restores client states without a target tree; that path must not reach pickle."""
    import orbax.checkpoint as ocp

    tree = {"leaf_0000": np.arange(6, dtype=np.float32).reshape(2, 3), "leaf_0001": np.ones(2, np.int32)}
    ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    ckptr.save(tmp_path / "client_states", args=ocp.args.StandardSave(tree))

    def refuse(*a, **k):
        raise AssertionError("pickle used during restore")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    back = ckptr.restore(tmp_path / "client_states", args=ocp.args.StandardRestore())
    ckptr.close()
    assert {k: np.asarray(v).tolist() for k, v in back.items()} == {k: v.tolist() for k, v in tree.items()}


# -- the whole package ---------------------------------------------------------------------------

FORBIDDEN = re.compile(r"pickle\.loads?\(|allow_pickle\s*=\s*True|(?<![\w.])eval\(|(?<![\w.])exec\(|yaml\.load\(|"
                       r"\bmarshal\b|\bshelve\b|\bdill\b|cloudpickle|jsonpickle|torch\.load\(|joblib\.load|"
                       r"\.extractall\(")


def test_package_never_unpickles_or_evaluates_data():
    hits = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if FORBIDDEN.search(line.split("#")[0]):
                hits.append(f"{path.relative_to(PACKAGE.parent)}:{i}: {line.strip()}")
    assert hits == []
    imports = re.compile(r"^\s*(import|from)\s+(c?pickle|_pickle|copyreg|pickletools)\b", re.M)
    users = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if imports.search(p.read_text()))
    assert users == []


def test_write_store_npz_round_trip_stays_pickle_free(tmp_path):
    clients = {"a": {"t": np.array([b"x", b"yz"], dtype=object), "y": np.arange(2)}}
    path = write_store(clients, tmp_path / "d.npz")
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            assert np.lib.format.read_array(z.open(name), allow_pickle=False).dtype != object
