"""Every loader on small files in the official formats, written at test time into a cache dir."""

import lzma
import os

import jax
import numpy as np
import pytest

from fedtrain.data import write_fedjax_sqlite, write_tff_sqlite, write_tff_hdf5
from fedtrain.data.download import DownloadError, Remote
from fedtrain.data.idx import read_idx, write_idx
from fedtrain.data.synthetic import SyntheticFederatedData
from fedtrain.datasets import cifar100, emnist, emnist_like, shakespeare, stackoverflow

RNG = np.random.default_rng(0)


def emnist_clients(n=4):
    ids = ["f2100_41", "f0123_07", "0123456789abcdef:f3101_00", "f2599_99"][:n]
    return {cid: {"pixels": RNG.random((i + 2, 28, 28), dtype=np.float32),
                  "label": RNG.integers(0, 62, i + 2).astype(np.int32)} for i, cid in enumerate(ids)}


def lzma_file(src, dst):
    with open(src, "rb") as f, lzma.open(dst, "wb") as out:
        out.write(f.read())


def test_emnist_fedjax_tff_hdf5(tmp_path):
    clients = emnist_clients()
    write_fedjax_sqlite(clients, tmp_path / "federated_emnist_train.sqlite")
    write_fedjax_sqlite(clients, tmp_path / "federated_emnist_digitsonly_test.sqlite")
    tff_clients = {k: {"pixels": v["pixels"], "label": v["label"].astype(np.int64)} for k, v in clients.items()}
    write_tff_sqlite({"all_train": tff_clients, "digits_only_train": tff_clients}, tmp_path / "plain.sqlite")
    lzma_file(tmp_path / "plain.sqlite", tmp_path / "emnist_all.sqlite.lzma")
    write_tff_hdf5(clients, tmp_path / "fed_emnist_train.h5")
    for source, kw in [("fedjax", {}), ("fedjax", {"only_digits": True}), ("tff", {}), ("tff-hdf5", {})]:
        split = "test" if kw else "train"
        data = emnist.load_data(split, source=source, cache_dir=tmp_path, progress=False, **kw)
        assert sorted(data.client_ids) == sorted(clients)
        ex = data.get_client("f2100_41")
        assert ex["x"].shape == (2, 28, 28, 1) and ex["x"].dtype == np.float32 and ex["y"].dtype == np.int32
        np.testing.assert_allclose(ex["x"][..., 0], 1 - clients["f2100_41"]["pixels"])
        assert data.client_size("f0123_07") == 3
        assert [data.get_client(c)["domain_id"][0] for c in sorted(clients)] == [1, 1, 0, 0]
    assert emnist.domain_id("0123456789abcdef:f2100_00") == 0 and emnist.domain_id("f2600_00") == 1
    with pytest.raises(ValueError, match="not an EMNIST writer id"):
        emnist.domain_id("bob")


def test_emnist_offline_error_names_url_and_place(tmp_path):
    with pytest.raises(DownloadError) as info:
        emnist.load_data("train", cache_dir=tmp_path, progress=False)
    msg = str(info.value)
    assert "federated_emnist_train.sqlite" in msg and str(tmp_path) in msg


def test_shakespeare_fedjax_and_tff(tmp_path, monkeypatch):
    monkeypatch.setattr(shakespeare, "TFF_SIZE", None)  # a small stand-in for the pinned official file
    monkeypatch.setattr(shakespeare, "TFF_SHA256", None)
    snippets = {"0000000000000000:HAMLET_HAMLET": [b"To be, or not to be\n", b"Ay \xff\n"],
                "0000000000000001:MACBETH_MACBETH": [b"Is this a dagger\n"]}
    clients = {c: {"snippets": np.array(s, dtype=object)} for c, s in snippets.items()}
    write_fedjax_sqlite(clients, tmp_path / "shakespeare_train.sqlite")
    write_tff_sqlite({"train": clients, "test": clients}, tmp_path / "plain.sqlite")
    lzma_file(tmp_path / "plain.sqlite", tmp_path / "shakespeare.sqlite.lzma")
    for source in ("fedjax", "tff"):
        data = shakespeare.load_data("train", source=source, cache_dir=tmp_path, progress=False)
        ex = data.get_client("0000000000000000:HAMLET_HAMLET")
        expected = shakespeare.preprocess_client([s.decode("latin-1") for s in snippets[
            "0000000000000000:HAMLET_HAMLET"]])
        assert ex["x"].shape == (1, 80)
        assert ex["x"][0, :5].tolist() == [shakespeare.BOS, *shakespeare.encode("To b")]
        assert shakespeare.OOV in ex["x"][0]  # the non-UTF-8 byte
        assert expected["x"].shape == ex["x"].shape
    assert shakespeare.load_data("test", min_snippets=5).num_clients == 843  # offline build unchanged


def test_stackoverflow(tmp_path):
    (tmp_path / "stackoverflow.word_count").write_text("the 100\nhow 50\nto 40\npython 30\n")
    clients = {"u1": {"tokens": np.array([b"how to python", b"the the zzz ."], dtype=object),
                      "type": np.array([b"question", b"answer"], dtype=object),
                      "score": np.array([1, 2])}}
    write_fedjax_sqlite(clients, tmp_path / "stackoverflow_train.sqlite")
    write_fedjax_sqlite(clients, tmp_path / "stackoverflow_test.sqlite")
    data = stackoverflow.load_data("train", vocab_size=3, cache_dir=tmp_path, progress=False)
    ex = data.get_client("u1")
    # vocab: the=3 how=4 to=5; OOV=6 (python is rank 4 > vocab_size 3)
    assert ex["x"].shape == (2, 20) and ex["x"][0, :5].tolist() == [1, 4, 5, 6, 0]
    assert ex["y"][0, :4].tolist() == [4, 5, 6, 2] and ex["y"][1, :5].tolist() == [3, 3, 6, 6, 2]
    assert ex["domain_id"].tolist() == [0, 1]
    assert stackoverflow.load_data("test", cache_dir=tmp_path, progress=False).get_client("u1")["x"].shape == (2, 30)
    tok = stackoverflow.Tokenizer(["a"], num_oov_buckets=4)
    assert tok.vocab_size == 8 and all(4 <= tok.word_id(w) < 8 for w in [b"x", b"y", b"zz"])
    assert tok.encode(["a " * 40], 5)["y"][0].tolist() == [3] * 5  # truncated, no EOS
    (tmp_path / "bad.word_count").write_text("the,100\n")
    with pytest.raises(ValueError, match="line 1: expected 'word count'"):
        stackoverflow.load_vocabulary(tmp_path / "bad.word_count")
    (tmp_path / "latin.word_count").write_bytes(b"caf\xe9 3\n")
    with pytest.raises(ValueError, match="line 1: not UTF-8"):
        stackoverflow.load_vocabulary(tmp_path / "latin.word_count")
    synth = stackoverflow.load_data("train", source="synthetic")
    assert synth.num_clients == 342_477 and synth.get_client(synth.client_ids[7])["x"].shape[1] == 20


def test_cifar100_tff_and_preprocessing(tmp_path, monkeypatch):
    clients = {str(i): {"image": RNG.integers(0, 256, (3, 32, 32, 3)).astype(np.uint8),
                        "label": np.array([5, 99, 0]), "coarse_label": np.array([1, 19, 0])} for i in range(3)}
    write_tff_sqlite({"train": clients, "test": clients}, tmp_path / "plain.sqlite")
    lzma_file(tmp_path / "plain.sqlite", tmp_path / "cifar100.sqlite.lzma")
    monkeypatch.setattr(cifar100, "TFF_SQLITE", cifar100.TFF_SQLITE._replace(size=None, sha256=None))
    fine = cifar100.load_data("train", cache_dir=tmp_path, progress=False)
    coarse = cifar100.load_data("test", coarse=True, cache_dir=tmp_path, progress=False)
    assert fine.get_client("1")["y"].tolist() == [5, 99, 0] and coarse.get_client("1")["y"].tolist() == [1, 19, 0]
    x = fine.get_client("0")["x"]
    assert x.dtype == np.uint8 and np.array_equal(x, clients["0"]["image"])
    out = jax.jit(cifar100.preprocess_train)(jax.random.key(0), x)
    assert out.shape == (3, 32, 32, 3) and out.dtype == np.float32
    same = jax.jit(lambda k, im: cifar100.random_crop_flip(k, im, padding=0))(jax.random.key(1), x)
    assert all(np.array_equal(s, im) or np.array_equal(s, im[:, ::-1]) for s, im in zip(np.asarray(same), x))
    np.testing.assert_allclose(cifar100.normalize(x)[0, 0, 0], (x[0, 0, 0] / 255 - cifar100.MEAN) / cifar100.STD,
                               rtol=1e-5)
    c = np.asarray(jax.jit(cifar100.center_crop_standardize)(x))
    assert c.shape == (3, 24, 24, 3) and abs(c.mean()) < 1e-4
    synth = cifar100.load_data("train", source="synthetic")
    assert synth.num_clients == 500 and synth.client_size(synth.client_ids[0]) == 100


def test_emnist_like_from_idx_files(tmp_path, monkeypatch):
    monkeypatch.setattr(emnist_like, "FASHION_DIRS", ())  # a system-wide install must not hide the error below
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for split, n in (("train", 400), ("t10k", 100)):
        write_idx(RNG.integers(0, 256, (n, 28, 28)).astype(np.uint8), folder / f"{split}-images-idx3-ubyte.gz")
        write_idx(np.tile(np.arange(10, dtype=np.uint8), n // 10), folder / f"{split}-labels-idx1-ubyte.gz")
    train, test = emnist_like.load_data(num_clients=20, cache_dir=tmp_path)
    assert train.num_clients == test.num_clients == 20 and train.client_ids == test.client_ids
    assert sum(train.client_size(c) for c in train.client_ids) == 400
    ex = train.get_client(train.client_ids[0])
    assert ex["x"].shape[1:] == (28, 28, 1) and ex["y"].max() < 10
    assert {int(train.get_client(c)["domain_id"][0]) for c in train.client_ids} == {0, 1}
    again = emnist_like.load_data("train", num_clients=20, cache_dir=tmp_path)
    assert all(np.array_equal(again.get_client(c)["y"], train.get_client(c)["y"]) for c in train.client_ids)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        emnist_like.load_data("train", cache_dir=tmp_path / "empty")
    with pytest.raises(ValueError, match="asked for 500 clients but there are only 400"):
        emnist_like.load_data("train", num_clients=500, partition="iid", cache_dir=tmp_path)


def test_idx_reader(tmp_path):
    for dtype in (np.uint8, np.int16, np.int32, np.float32, np.float64):
        arr = np.arange(24).reshape(2, 3, 4).astype(dtype)
        np.testing.assert_array_equal(read_idx(write_idx(arr, tmp_path / "a.idx")), arr)
    raw = (tmp_path / "a.idx").read_bytes()
    (tmp_path / "t.idx").write_bytes(raw[:-5])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_idx(tmp_path / "t.idx")
    (tmp_path / "n.idx").write_bytes(b"PK\x03\x04junk")
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(tmp_path / "n.idx")


def test_synthetic_presets():
    e = SyntheticFederatedData.like("emnist")
    assert e.num_clients == 3400 and 600_000 < e.client_sizes().sum() < 750_000
    cid = e.client_ids[3]
    a, b = e.get_client(cid), SyntheticFederatedData.like("emnist").get_client(cid)
    assert np.array_equal(a["pixels"], b["pixels"]) and a["pixels"].shape == (e.client_size(cid), 28, 28)
    sub = e.subset(e.client_ids[:5])
    assert sub.num_clients == 5 and sub.client_sizes().tolist() == e.client_sizes()[:5].tolist()
    with pytest.raises(KeyError, match="unknown client"):
        sub.get_client(e.client_ids[6])
    data = emnist.load_data("train", source="synthetic")
    assert data.get_client(data.client_ids[0])["x"].shape[1:] == (28, 28, 1)


def test_synthetic_stackoverflow_never_targets_bos():
    from fedtrain.datasets import stackoverflow
    data = stackoverflow.load_data("train", source="synthetic")
    for cid in data.client_ids[:20]:
        ex = data.get_client(cid)
        assert not np.any(ex["y"] == stackoverflow.BOS) and ex["y"].dtype == np.int32


def py2_array_pickle(splits) -> bytes:
    """A protocol-2 pickle of ``((x, y), ...)`` as Python 2's numpy wrote ``mnist.pkl.gz`` (raw BINSTRING data,
    the dtype memoized and fetched again with BINGET)."""
    import struct

    out = [b"\x80\x02cnumpy.core.multiarray\n_reconstruct\nq\x01cnumpy\nndarray\nq\x02cnumpy\ndtype\nq\x03"]
    dtypes: dict[str, int] = {}

    def short(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b

    for pair in splits:
        out.append(b"(")
        for a in pair:
            a = np.ascontiguousarray(a)
            out.append(b"h\x01h\x02K\x00\x85" + short(b"b") + b"\x87R(K\x01")
            out.append(b"(" + b"".join(b"J" + struct.pack("<i", n) for n in a.shape) + b"t")
            code = a.dtype.str[1:]
            if code in dtypes:
                out.append(b"h" + bytes([dtypes[code]]))
            else:
                dtypes[code] = 10 + len(dtypes)
                out.append(b"h\x03" + short(code.encode()) + b"K\x00K\x01\x87Rq" + bytes([dtypes[code]])
                           + b"(K\x03" + short(b"<") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
            raw = a.astype(a.dtype.newbyteorder("<")).tobytes()
            out.append(b"\x89T" + struct.pack("<i", len(raw)) + raw + b"tb")
        out.append(b"t")
    out.append(b"\x87.")
    return b"".join(out)


def test_mnist_pickle_reader_rebuilds_arrays_and_calls_nothing(tmp_path):
    import os
    import pickle

    arrays = tuple((RNG.random((4, 784)).astype(np.float32), np.arange(4)) for _ in range(3))
    crafted = py2_array_pickle(arrays)
    assert all(np.array_equal(a, b) for pair, orig in zip(pickle.loads(crafted, encoding="latin1"), arrays)
               for a, b in zip(pair, orig))  # the crafted file is a real pickle of these arrays
    back = emnist_like.load_mnist_pickle(crafted)
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for pair, orig in zip(back, arrays) for a, b in zip(pair, orig))
    marker = tmp_path / "PWNED"

    class System:
        def __reduce__(self):
            return os.system, (f"mkdir {marker}",)

    class Eval:
        def __reduce__(self):
            return eval, (f"__import__('os').mkdir({str(marker)!r})",)

    for payload, name in ((System(), r"(posix|os|nt)\.system"), (Eval(), r"(builtins|__builtin__)\.eval")):
        for protocol in (0, 2):
            with pytest.raises(ValueError, match=f"refusing to load global .*{name}"):
                emnist_like.load_mnist_pickle(pickle.dumps(((payload, 1), (2, 3), (4, 5)), protocol=protocol))
            assert not marker.exists()
        with pytest.raises(ValueError, match="unsupported pickle opcode"):  # protocol 4's FRAME: not this file
            emnist_like.load_mnist_pickle(pickle.dumps(((payload, 1), (2, 3), (4, 5)), protocol=4))
        assert not marker.exists()
    with pytest.raises(ValueError, match="ends inside an opcode"):
        emnist_like.load_mnist_pickle(crafted[: len(crafted) // 2])
    objects = py2_array_pickle([(np.zeros(2), np.zeros(2))] * 3).replace(b"U\x02f8", b"U\x02O8")
    with pytest.raises(ValueError, match="not numbers"):
        emnist_like.load_mnist_pickle(objects)
    with pytest.raises(ValueError, match="three .images, labels. pairs"):
        emnist_like.load_mnist_pickle(py2_array_pickle([(np.zeros(2), np.zeros(2))]))
