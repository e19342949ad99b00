"""Federated CIFAR-100: 500 train / 100 test clients of 100 images (TFF's Pachinko partition).

``source='tff'`` (default) fetches TFF's ``cifar100.sqlite.lzma`` (size and
sha256 checked, as FedJAX does); ``'tff-hdf5'`` the legacy ``fed_cifar100.tar.bz2``
(sha256 checked, as TFF did);
``'synthetic'`` seeded data of the same shapes. Raw features: ``image`` uint8
[N,32,32,3], ``label`` [0,100), ``coarse_label`` [0,20). ``load_data`` gives
``x`` (the uint8 image), ``y`` (fine, or coarse with ``coarse=True``) int32;
augment on device with the jittable functions below.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from fedtrain.data.download import Remote, fetch_lzma, fetch_member
from fedtrain.data.synthetic import SyntheticFederatedData
from fedtrain.data.tff_hdf5 import TFFHDF5Data
from fedtrain.data.tff_sqlite import TFFSQLiteData

TFF_URL = "https://storage.googleapis.com/tff-datasets-public/"
# Size and sha256 from FedJAX (fedjax/datasets/cifar100.py, _TFF_SQLITE_COMPRESSED_*).
TFF_SQLITE = Remote(TFF_URL + "cifar100.sqlite.lzma", "cifar100.sqlite.lzma", 153_019_920,
                    "23d3916c9caa33395737ee560cc7cb77bbd05fc7b73647ee7be3a7e764172939")
# sha256 from tff.simulation.datasets.cifar100.load_data (TFF 0.17 and before, tf.keras.utils.get_file's
# file_hash); TFF gives no size.
TFF_HDF5 = Remote(TFF_URL + "fed_cifar100.tar.bz2", "fed_cifar100.tar.bz2",
                  sha256="e8575e22c038ecef1ce6c7d492d7abee7da13b1e1ba9b70a7fc18531ba7590de")
SPLITS = ("train", "test")
SOURCES = ("tff", "tff-hdf5", "synthetic")
FEATURES = {"image": ((32, 32, 3), np.uint8), "label": ((), np.int64), "coarse_label": ((), np.int64)}
MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
STD = np.array([0.2023, 0.1994, 0.2010], np.float32)


def raw_split(split: str, *, source: str = "tff", cache_dir=None, progress: bool = True):
    """The raw ``{image, label, coarse_label}`` store of one split."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}.")
    if source == "tff":
        return TFFSQLiteData(fetch_lzma(TFF_SQLITE, cache_dir, progress=progress), split, features=FEATURES)
    if source == "tff-hdf5":
        return TFFHDF5Data(fetch_member(TFF_HDF5, f"fed_cifar100_{split}.h5", cache_dir, progress=progress))
    if source == "synthetic":
        return SyntheticFederatedData.like("cifar100", seed=0 if split == "train" else 1,
                                           num_clients=500 if split == "train" else 100)
    raise ValueError(f"unknown source {source!r}; use one of {SOURCES}.")


def load_data(split: str | None = None, *, coarse: bool = False, source: str = "tff",
              cache_dir: str | os.PathLike | None = None, progress: bool = True):
    """``{x: uint8 [N,32,32,3], y: int32}`` per client; ``split=None`` returns ``(train, test)``."""
    if split is None:
        return tuple(load_data(s, coarse=coarse, source=source, cache_dir=cache_dir, progress=progress)
                     for s in SPLITS)
    raw = raw_split(split, source=source, cache_dir=cache_dir, progress=progress)
    key = "coarse_label" if coarse else "label"

    def prep(ex):
        return {"x": np.asarray(ex["image"], np.uint8), "y": np.asarray(ex[key]).astype(np.int32)}

    if isinstance(raw, SyntheticFederatedData):
        return raw.preprocess(prep)
    return raw.preprocess(prep, keeps_size=True)


def normalize(images: jax.Array) -> jax.Array:
    """uint8 [..., 32, 32, 3] -> float32, per-channel ``(x/255 - mean) / std``."""
    return (images.astype(jnp.float32) / 255.0 - MEAN) / STD


def random_crop_flip(rng: jax.Array, images: jax.Array, padding: int = 4) -> jax.Array:
    """Pad ``padding`` zeros per side, crop back at a random offset, flip left-right with p=0.5 (per image)."""
    n, h, w, c = images.shape
    k_off, k_flip = jax.random.split(rng)
    offsets = jax.random.randint(k_off, (n, 2), 0, 2 * padding + 1)
    flips = jax.random.bernoulli(k_flip, 0.5, (n,))
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))

    def one(img, off, flip):
        out = jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))
        return jnp.where(flip, out[:, ::-1, :], out)

    return jax.vmap(one)(padded, offsets, flips)


def preprocess_train(rng: jax.Array, images: jax.Array) -> jax.Array:
    """Crop + flip + normalize (the FedJAX / pytorch-cifar recipe), jittable."""
    return normalize(random_crop_flip(rng, images))


def center_crop_standardize(images: jax.Array, size: int = 24) -> jax.Array:
    """TFF's eval preprocessing: center ``size`` crop, then per-image standardization."""
    h, w = images.shape[-3:-1]
    top, left = (h - size) // 2, (w - size) // 2
    x = images[..., top:top + size, left:left + size, :].astype(jnp.float32)
    mean = x.mean(axis=(-3, -2, -1), keepdims=True)
    std = x.std(axis=(-3, -2, -1), keepdims=True)
    return (x - mean) / jnp.maximum(std, 1.0 / jnp.sqrt(float(size * size * x.shape[-1])))
