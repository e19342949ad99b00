"""Store faults with real files: paths SQLite's URI parser would misread, decompression bombs, HDF5 checksums."""

import os
import sqlite3
import threading
import tracemalloc
import zlib

import h5py
import msgpack
import numpy as np
import pytest

from fedtrain.data import FedjaxSQLiteData, StoreError, open_store, write_store
from fedtrain.data.codec import decode_examples
from fedtrain.data.fedjax_sqlite import SCHEMA

FORMATS = {"fedjax-sqlite": ".sqlite", "tff-sqlite": ".tff.sqlite", "tff-hdf5": ".h5", "npz": ".npz"}
# Each holds a character that means something in a file: URI (% escapes, ? query, # fragment), a space,
# or non-ASCII text; "pct%41/x%20y" reads as "pctA/x y" when the path is not escaped.
ODD_NAMES = ["pct%41/x%20y", "q?mark/a?b=c", "hash#frag/d#e", "sp ace/f g", "ünï/日本語", "all%25?#ü /h%3Fi"]


def clients(seed=0, n=3):
    rng = np.random.default_rng(seed)
    return {f"c{seed}_{i}": {"x": rng.random((i + 2, 4), dtype=np.float32),
                             "y": rng.integers(0, 10, i + 2).astype(np.int32)} for i in range(n)}


def assert_clients(data, expected):
    assert sorted(data.client_ids) == sorted(expected)
    for cid, ex in expected.items():
        got = data.get_client(cid)
        assert got.keys() == ex.keys()
        for k in ex:
            np.testing.assert_array_equal(got[k], ex[k])


def _path(tmp_path, name, fmt):
    path = tmp_path / (name + FORMATS[fmt])
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# -- 11: paths with %, ?, #, spaces, non-ASCII ---------------------------------------------------------------------

@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("name", ODD_NAMES)
def test_odd_paths_open_the_file_named(tmp_path, fmt, name):
    expected = clients()
    path = write_store(expected, _path(tmp_path, name, fmt), fmt)
    data = open_store(path)
    assert_clients(data, expected)
    assert data.client_size(next(iter(expected))) == 2


@pytest.mark.parametrize("fmt", ["fedjax-sqlite", "tff-sqlite"])
def test_percent_path_never_opens_the_decoded_path(tmp_path, fmt):
    """``pct%41/x%20y`` must not read ``pctA/x y``, even when that file exists."""
    decoy, ours = clients(seed=1), clients(seed=2)
    write_store(decoy, _path(tmp_path, "pctA/x y", fmt), fmt)
    path = write_store(ours, _path(tmp_path, "pct%41/x%20y", fmt), fmt)
    assert_clients(open_store(path), ours)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_missing_file_says_does_not_exist(tmp_path, fmt):
    path = _path(tmp_path, "pct%41/missing", fmt)
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        open_store(path)
    assert "corrupt" not in str(info.value)


@pytest.mark.parametrize("fmt", ["fedjax-sqlite", "tff-sqlite", "tff-hdf5"])
def test_file_removed_after_open_says_does_not_exist(tmp_path, fmt):
    """A thread opening its own handle after the file was deleted gets 'does not exist', not 'corrupt'."""
    expected = clients()
    path = write_store(expected, _path(tmp_path, "sp ace/d%41", fmt), fmt)
    data = open_store(path)
    cid = next(iter(expected))
    data.get_client(cid)  # this thread's handle stays valid
    os.remove(path)
    errors = []

    def read():
        try:
            data.get_client(cid)
        except Exception as err:  # noqa: BLE001 - the test inspects it
            errors.append(err)

    thread = threading.Thread(target=read)
    thread.start()
    thread.join()
    data.close()
    assert len(errors) == 1 and isinstance(errors[0], FileNotFoundError), errors
    assert "does not exist" in str(errors[0]) and "corrupt" not in str(errors[0])


# -- 12: decompression bombs in FedJAX SQLite rows -------------------------------------------------------------------

def bomb(n_bytes: int, chunk: int = 1 << 20) -> bytes:
    """``zlib(msgpack({'x': uint8 zeros [n_bytes]}))``, compressed chunk by chunk (never held inflated)."""
    inner = (b"\x93" + msgpack.packb([n_bytes]) + msgpack.packb("uint8") + b"\xc6" + n_bytes.to_bytes(4, "big"))
    outer = b"\x81" + msgpack.packb("x") + b"\xc9" + (len(inner) + n_bytes).to_bytes(4, "big") + b"\x01"
    c = zlib.compressobj(9)
    parts = [c.compress(outer + inner)]
    zeros = bytes(chunk)
    left = n_bytes
    while left:
        parts.append(c.compress(zeros[:min(chunk, left)]))
        left -= min(chunk, left)
    parts.append(c.flush())
    return b"".join(parts)


def fedjax_file(path, rows):
    con = sqlite3.connect(path)
    con.execute(SCHEMA)
    con.executemany("INSERT INTO federated_data VALUES (?, ?, ?)", rows)
    con.commit()
    con.close()
    return str(path)


def test_bomb_helper_is_a_valid_blob():
    x = decode_examples(bomb(1000, chunk=300))["x"]
    assert x.shape == (1000,) and x.dtype == np.uint8 and not x.any()


def test_decompression_bomb_is_refused_before_it_inflates(tmp_path):
    n = 64 << 20
    blob = bomb(n)
    assert len(blob) < n // 500  # ~64 KiB on disk for 64 MiB inflated
    path = fedjax_file(tmp_path / "bomb.sqlite", [(b"ok", zlib.compress(msgpack.packb({})), 0),
                                                   (b"bomber", blob, 1)])
    data = open_store(path)
    tracemalloc.start()
    try:
        with pytest.raises(StoreError, match=r"client 'bomber' declares 1 examples but its data inflates to more "
                                             r"than \d+ bytes.*max_bytes_per_example"):
            data.get_client("bomber")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak {peak} bytes: the row was inflated"


def test_large_examples_need_a_larger_cap(tmp_path):
    rng = np.random.default_rng(0)
    big = {"x": rng.integers(0, 256, (3, 3 << 19), dtype=np.uint8)}  # 1.5 MiB per example, incompressible
    small = {"x": rng.integers(0, 256, (3, 1 << 19), dtype=np.uint8)}  # 0.5 MiB per example
    path = write_store({"big": big, "small": small}, tmp_path / "d.sqlite")
    data = open_store(path)
    np.testing.assert_array_equal(data.get_client("small")["x"], small["x"])
    with pytest.raises(StoreError, match="client 'big' declares 3 examples"):
        data.get_client("big")
    roomy = FedjaxSQLiteData(path, max_bytes_per_example=2 << 20)
    np.testing.assert_array_equal(roomy.get_client("big")["x"], big["x"])


def test_truncated_blob_is_still_corrupt(tmp_path):
    blob = zlib.compress(msgpack.packb({}))[:-3]
    data = open_store(fedjax_file(tmp_path / "t.sqlite", [(b"t", blob, 0)]))
    with pytest.raises(StoreError, match="client 't'.*truncated stream.*corrupt"):
        data.get_client("t")


# -- 13: HDF5 checksums ----------------------------------------------------------------------------------------------

def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))


def _data_offset(path, dataset):
    with h5py.File(path, "r") as f:
        ds = f[dataset]
        return ds.id.get_offset() if ds.chunks is None else ds.id.get_chunk_info(0).byte_offset


def test_hdf5_flipped_byte_is_a_checksum_error(tmp_path):
    rng = np.random.default_rng(0)
    data = {"alice": {"pixels": rng.random((5, 28, 28), dtype=np.float32), "label": np.arange(5, dtype=np.int32)},
            "bob": {"pixels": rng.random((7, 28, 28), dtype=np.float32), "label": np.arange(7, dtype=np.int32)}}
    path = write_store(data, tmp_path / "d.h5")
    _flip(path, _data_offset(path, "examples/bob/pixels") + 1001)
    store = open_store(path)
    assert_clients(store.subset(["alice"]), {"alice": data["alice"]})
    assert store.client_size("bob") == 7
    with pytest.raises(StoreError, match=r"client 'bob', feature 'pixels' fails its fletcher32 checksum"):
        store.get_client("bob")


def test_hdf5_flipped_text_byte_is_a_checksum_error(tmp_path):
    snippets = np.array([b"To be, or not to be: that is the question", b"MARKER-0123456789"], dtype=object)
    path = write_store({"hamlet": {"snippets": snippets}}, tmp_path / "s.h5")
    with open(path, "rb") as f:
        raw = f.read()
    assert raw.count(b"MARKER-0123456789") == 1
    _flip(path, raw.index(b"MARKER-0123456789") + 7)
    with pytest.raises(StoreError, match=r"client 'hamlet', feature 'snippets' fails its sha256 checksum"):
        open_store(path).get_client("hamlet")


def test_hdf5_written_with_checksums_and_readable_by_plain_h5py(tmp_path):
    from fedtrain.data import write_tff_hdf5
    ex = {"x": np.arange(12, dtype=np.float64).reshape(6, 2), "e": np.zeros((6, 0), np.int64)}
    path = write_tff_hdf5({"a": ex, "empty": {"x": np.zeros((0, 2)), "e": np.zeros((0,), np.int64)}},
                          tmp_path / "c.h5", compression="gzip")
    with h5py.File(path, "r") as f:  # what TFF's HDF5ClientData does: plain h5py reads
        for cid in ("a", "empty"):
            for name in ("x", "e"):
                assert f[f"examples/{cid}/{name}"].fletcher32
        np.testing.assert_array_equal(f["examples/a/x"][()], ex["x"])
    plain = write_tff_hdf5({"a": ex}, tmp_path / "p.h5", checksum=False)
    with h5py.File(plain, "r") as f:
        assert not f["examples/a/x"].fletcher32 and f["examples/a/x"].chunks is None
    assert_clients(open_store(plain), {"a": ex})
