"""FedJAX SQLite byte-compatibility, checked against FedJAX 0.0.17 itself (run in its own virtualenv).

(a) fedtrain writes a FedJAX SQLite file covering every dtype FedJAX stores
    (bool, signed/unsigned ints, float16/32/64, bfloat16, complex64/128, object
    arrays of bytes including empty and non-UTF-8 values, 0 to 3 feature
    dimensions, an empty client, a big-endian array, non-UTF-8 client ids);
    FedJAX's ``SQLiteFederatedData`` reads it and compares every array.
(b) FedJAX's ``SQLiteFederatedDataBuilder`` writes the same clients;
    fedtrain's ``FedjaxSQLiteData`` reads them and compares.
(c) Both encoders' ``msgpack_serialize`` output is compared byte for byte on
    every client and on trees with numpy scalars, Python complex and nested
    lists/dicts, and each side decodes the other's bytes.

    python benchmarks/fedjax_compat.py [--fedjax-python PATH] [--workdir DIR]

The FedJAX interpreter defaults to ``$FEDTRAIN_FEDJAX_VENV/bin/python``, else
``~/.cache/fedtrain/fedjax-venv/bin/python`` (``benchmarks/fedjax_env.sh``
creates it). This file runs under both interpreters: the fixture is built with
exact arithmetic only, so both build identical arrays.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
import zlib

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
NUMERIC = ["bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float16", "float32",
           "float64", "complex64", "complex128", "bfloat16"]


# ---------------------------------------------------------------------------- fixture (both interpreters)
def _numeric(dtype_name: str, shape: tuple[int, ...], salt: int) -> np.ndarray:
    size = int(np.prod(shape))
    base = np.arange(size, dtype=np.int64) * (2 * salt + 3) - size // 2
    if dtype_name == "bool":
        return (base % 3 == 0).reshape(shape)
    if dtype_name == "bfloat16":
        import ml_dtypes

        return (base.astype(np.float32) / 8).astype(ml_dtypes.bfloat16).reshape(shape)
    dtype = np.dtype(dtype_name)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        out = (base % (int(info.max) - int(info.min) + 1 if info.bits < 64 else 2**62)).astype(np.int64)
        out = (out + int(info.min) if info.bits < 64 else out).astype(dtype)
        if size >= 2:  # the extremes of the type
            out.flat[0], out.flat[-1] = info.min, info.max
        return out.reshape(shape)
    values = base.astype(np.float64) / 7.0
    if dtype.kind == "c":
        values = values + 1j * (base.astype(np.float64) / 3.0)
    out = values.astype(dtype)
    if size >= 3:  # non-finite values survive bit for bit
        out.flat[0], out.flat[1], out.flat[2] = np.inf, -np.inf, np.nan
    return out.reshape(shape)


def _bytes_array(shape: tuple[int, ...], salt: int) -> np.ndarray:
    pool = [b"", b"hello", "ünïcödé".encode("utf-8"), b"\xff\xfe\x00raw", bytes(range(256)), b"x" * 1000]
    flat = [pool[(i + salt) % len(pool)] + str(i).encode() * (i % 2) for i in range(int(np.prod(shape)))]
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out.reshape(shape)


def fixture_clients(big_endian: bool = True) -> list[tuple[bytes, dict[str, np.ndarray]]]:
    """``[(client_id bytes, {feature: array})]``; ``big_endian`` adds a client FedJAX itself cannot encode."""
    clients = []
    for c, n in enumerate([5, 1, 3]):
        examples = {}
        for k, name in enumerate(NUMERIC):
            shape = [(n,), (n, 4), (n, 2, 3), (n, 2, 2, 2)][(k + c) % 4]
            examples[f"{name}_f"] = _numeric(name, tuple(shape), k + c)
        examples["text"] = _bytes_array((n,), c)
        examples["tokens"] = _bytes_array((n, 3), c + 1)
        clients.append(examples)
    ids = [b"f0000_00", "writer_ünï".encode("utf-8"), b"\xff\x00not-utf8"]
    out = list(zip(ids, clients))
    out.append((b"empty", {"x": np.zeros((0, 28, 28), np.float32), "label": np.zeros((0,), np.int32),
                           "text": np.empty((0,), dtype=object)}))
    if big_endian:
        out.append((b"big_endian", {"x": _numeric("float32", (4, 3), 1).astype(">f4"),
                                    "y": _numeric("int64", (4,), 2).astype(">i8")}))
    return out


def fixture_trees() -> list:
    """Trees beyond client dicts: numpy scalars, Python complex, nested lists and dicts."""
    import ml_dtypes

    return [
        {"scalars": [np.float32(1.5), np.int64(-7), np.uint8(255), np.bool_(True), np.float64(np.nan),
                     np.complex64(1 - 2j), np.float16(0.1), ml_dtypes.bfloat16(3.0)]},
        {"complex": complex(1.25, -3.5), "nested": {"a": [1, 2.5, "s", b"b", None, True],
                                                    "arr": np.arange(6, dtype=np.int16).reshape(2, 3)}},
        [np.zeros((0,), np.float32), np.zeros((2, 0, 3), np.uint8), _bytes_array((2, 2), 3), np.array(5.0)],
    ]


def same(a, b, where: str = "") -> list[str]:
    """Differences between tree ``a`` and its decoded form ``b``: types, dtypes, shapes, exact bytes.

    Both encoders write a Python ``complex`` as a numpy scalar, so it decodes as ``np.complex128``.
    """
    if type(a) is complex:
        a = np.complex128(a)
    if isinstance(a, dict) or isinstance(b, dict):
        if not (isinstance(a, dict) and isinstance(b, dict)) or list(a) != list(b):
            return [f"{where}: keys {list(a) if isinstance(a, dict) else type(a)} vs "
                    f"{list(b) if isinstance(b, dict) else type(b)}"]
        return [d for k in a for d in same(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        if not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple))) or len(a) != len(b):
            return [f"{where}: {type(a).__name__} vs {type(b).__name__}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in same(x, y, f"{where}[{i}]")]
    if isinstance(a, (np.ndarray, np.generic)) or isinstance(b, (np.ndarray, np.generic)):
        if type(a) is not type(b):
            return [f"{where}: {type(a).__name__} vs {type(b).__name__}"]
        x, y = np.asarray(a), np.asarray(b)
        want = x.dtype.newbyteorder("<") if x.dtype.byteorder == ">" else x.dtype
        if y.dtype.name != want.name or x.shape != y.shape:
            return [f"{where}: {x.dtype}{x.shape} vs {y.dtype}{y.shape}"]
        if x.dtype.hasobject:
            xs, ys = x.ravel().tolist(), y.ravel().tolist()
            if any(type(v) is not bytes for v in ys) or xs != ys:
                return [f"{where}: bytes values differ"]
            return []
        if x.astype(want).tobytes() != y.astype(y.dtype.newbyteorder("<")).tobytes():
            return [f"{where}: values differ"]
        return []
    if type(a) is not type(b) or (a != b and not (a != a and b != b)):
        return [f"{where}: {a!r} vs {b!r}"]
    return []


def _write_blobs(path: str, blobs: list[bytes]) -> None:
    with open(path, "wb") as f:
        for blob in blobs:
            f.write(len(blob).to_bytes(8, "little") + blob)


def _read_blobs(path: str) -> list[bytes]:
    with open(path, "rb") as f:
        raw = f.read()
    out, pos = [], 0
    while pos < len(raw):
        n = int.from_bytes(raw[pos:pos + 8], "little")
        out.append(raw[pos + 8:pos + 8 + n])
        pos += 8 + n
    return out


# ---------------------------------------------------------------------------- FedJAX side
def fedjax_side(workdir: str) -> dict:
    from fedjax.core import serialization
    from fedjax.core.sqlite_federated_data import SQLiteFederatedData, SQLiteFederatedDataBuilder

    checks = {}
    # (a) fedtrain's file through FedJAX's reader.
    expected = fixture_clients(big_endian=True)
    data = SQLiteFederatedData.new(os.path.join(workdir, "by_fedtrain.sqlite"))
    ids = list(data.client_ids())
    diffs = [] if ids == [c for c, _ in expected] else [f"client ids {ids} vs {[c for c, _ in expected]}"]
    sizes = dict(data.client_sizes())
    for cid, ex in expected:
        got = data.get_client(cid).all_examples()
        diffs += same(ex, got, repr(cid))
        n = len(next(iter(ex.values())))
        if sizes.get(cid) != n or data.client_size(cid) != n:
            diffs.append(f"{cid!r}: num_examples {sizes.get(cid)} vs {n}")
    checks["fedjax_reads_fedtrain_file"] = diffs

    # (c) FedJAX decodes fedtrain's msgpack; its own msgpack goes back for a byte comparison.
    objects = [ex for _, ex in fixture_clients(big_endian=False)] + fixture_trees()
    theirs = _read_blobs(os.path.join(workdir, "fedtrain.msgpack"))
    diffs = []
    for i, (obj, blob) in enumerate(zip(objects, theirs)):
        diffs += same(obj, serialization.msgpack_deserialize(blob), f"object {i}")
    checks["fedjax_decodes_fedtrain_msgpack"] = diffs
    _write_blobs(os.path.join(workdir, "fedjax.msgpack"), [serialization.msgpack_serialize(o) for o in objects])

    # (b) FedJAX's builder writes the file fedtrain reads.
    path = os.path.join(workdir, "by_fedjax.sqlite")
    if os.path.exists(path):
        os.remove(path)
    with SQLiteFederatedDataBuilder(path) as builder:
        builder.add_many(fixture_clients(big_endian=False))
    return checks


# ---------------------------------------------------------------------------- fedtrain side
def default_fedjax_python() -> str:
    venv = os.environ.get("FEDTRAIN_FEDJAX_VENV") or os.path.join(
        os.environ.get("FEDTRAIN_BENCH_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fedtrain"),
        "fedjax-venv")
    return os.path.join(venv, "bin", "python")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fedjax-python", default=default_fedjax_python(),
                        help="python of a FedJAX 0.0.17 virtualenv (benchmarks/fedjax_env.sh)")
    parser.add_argument("--workdir", help="where to write the files (default: a temporary directory)")
    parser.add_argument("--output", default=os.path.join(HERE, "results", "fedjax_compat.json"))
    parser.add_argument("--fedjax-side", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fedjax_side:
        print("RESULT " + json.dumps(fedjax_side(args.workdir)))
        return {}

    sys.path.insert(0, os.path.dirname(HERE))
    from fedtrain.data import FedjaxSQLiteData, write_fedjax_sqlite
    from fedtrain.data.codec import msgpack_deserialize, msgpack_serialize
    from fedtrain.data.fedjax_sqlite import id_to_key

    if not os.path.exists(args.fedjax_python):
        parser.error(f"no FedJAX interpreter at {args.fedjax_python}; create it with benchmarks/fedjax_env.sh "
                     "or pass --fedjax-python.")
    workdir = args.workdir or tempfile.mkdtemp(prefix="fedtrain-fedjax-compat-")
    os.makedirs(workdir, exist_ok=True)
    clients = fixture_clients(big_endian=True)
    plain = fixture_clients(big_endian=False)
    objects = [ex for _, ex in plain] + fixture_trees()
    # fedtrain ids are str; bytes that are not UTF-8 map through surrogateescape.
    write_fedjax_sqlite({cid.decode("utf-8", "surrogateescape"): ex for cid, ex in clients},
                        os.path.join(workdir, "by_fedtrain.sqlite"), overwrite=True)
    ours = [msgpack_serialize(o) for o in objects]
    _write_blobs(os.path.join(workdir, "fedtrain.msgpack"), ours)

    proc = subprocess.run([args.fedjax_python, os.path.abspath(__file__), "--fedjax-side", "--workdir", workdir],
                          capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"the FedJAX side failed:\n{proc.stderr[-4000:]}")
    checks = json.loads(lines[-1][len("RESULT "):])

    theirs = _read_blobs(os.path.join(workdir, "fedjax.msgpack"))
    checks["msgpack_bytes_identical"] = [f"object {i}: {len(a)} vs {len(b)} bytes"
                                         for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    checks["fedtrain_decodes_fedjax_msgpack"] = [d for i, (o, b) in enumerate(zip(objects, theirs))
                                                 for d in same(o, msgpack_deserialize(b), f"object {i}")]
    diffs = []
    with FedjaxSQLiteData(os.path.join(workdir, "by_fedjax.sqlite")) as store:
        want_ids = [cid.decode("utf-8", "surrogateescape") for cid, _ in plain]
        if store.client_ids != want_ids:
            diffs.append(f"client ids {store.client_ids} vs {want_ids}")
        for cid, ex in plain:
            sid = cid.decode("utf-8", "surrogateescape")
            diffs += same(ex, store.get_client(sid), repr(cid))
            if store.client_size(sid) != len(next(iter(ex.values()))):
                diffs.append(f"{cid!r}: size {store.client_size(sid)}")
    checks["fedtrain_reads_fedjax_file"] = diffs
    # The stored rows (id, zlib blob, num_examples) of the two files, compared directly.
    rows = {}
    for name in ("by_fedtrain", "by_fedjax"):
        con = sqlite3.connect(os.path.join(workdir, f"{name}.sqlite"))
        rows[name] = {bytes(k): (bytes(d), n, type(k).__name__)
                      for k, d, n in con.execute("SELECT client_id, data, num_examples FROM federated_data")}
        con.close()
    checks["sqlite_rows_identical"] = [
        f"{cid!r}: " + ", ".join(f for f, ok in (("zlib blob", a[0] == b[0]), ("msgpack", zlib.decompress(a[0]) ==
                                 zlib.decompress(b[0])), ("num_examples", a[1] == b[1]), ("id type", a[2] == b[2]))
                                 if not ok)
        for cid, b in rows["by_fedjax"].items() for a in [rows["by_fedtrain"].get(id_to_key(
            cid.decode("utf-8", "surrogateescape")))] if a is None or a != b]

    version = subprocess.run([args.fedjax_python, "-c", "from importlib.metadata import version as v; "
                              "print(v('fedjax'), v('jax'), v('numpy'), v('msgpack'))"],
                             capture_output=True, text=True).stdout.split()
    report = {"benchmark": "fedjax_compat", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "fedjax_env": dict(zip(("fedjax", "jax", "numpy", "msgpack"), version)),
              "fedtrain_env": {"numpy": np.__version__, "msgpack": ".".join(map(str, __import__("msgpack").version))},
              "clients": len(clients), "features": sorted({k for _, ex in clients for k in ex}),
              "objects_compared": len(objects), "checks": {k: {"ok": not v, "differences": v[:20]}
                                                           for k, v in checks.items()}}
    report["ok"] = all(c["ok"] for c in report["checks"].values())
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    print("| check | result |\n|---|---|")
    for name, c in report["checks"].items():
        print(f"| {name} | {'identical' if c['ok'] else '; '.join(c['differences'][:3])} |")
    print(f"\nFedJAX {report['fedjax_env'].get('fedjax')} (numpy {report['fedjax_env'].get('numpy')}) vs fedtrain "
          f"(numpy {np.__version__}); {len(clients)} clients, {len(report['features'])} features, "
          f"{len(objects)} msgpack objects\nwrote {args.output}")
    if not report["ok"]:
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    main()
