"""FedJAX's msgpack codec for client examples (``fedjax.serialization``).

A client is a dict ``feature -> np.ndarray`` packed with msgpack and these
extension types, then ``zlib``-compressed in the SQLite ``data`` column:

- 1 ndarray: ``msgpack((shape, dtype_name, C-order bytes))``; bfloat16 by name.
- 2 native complex: ``msgpack((real, imag))``; read only. FedJAX writes a
  Python ``complex`` as ext 3 (numpy's ``issctype`` accepts it), so this
  module does too and it reads back as ``np.complex128``.
- 3 numpy scalar: as ext 1 of a 0-d array, unpacked to a scalar.
- 4 object ndarray of ``bytes``: ``msgpack((shape, [bytes, ...]))``.

Encoding the same dict gives the same bytes as FedJAX, and FedJAX's reader
decodes what this module writes. Arrays are written little-endian (FedJAX
stores only the dtype name, so big-endian input is converted first).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import msgpack
import numpy as np

EXT_NDARRAY = 1
EXT_COMPLEX = 2
EXT_NPSCALAR = 3
EXT_BYTES_NDARRAY = 4


class CodecError(ValueError):
    """A blob is not a valid FedJAX msgpack encoding, or a value cannot be encoded."""


def _dtype_from_name(name: bytes) -> np.dtype:
    if name == b"bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    try:
        return np.dtype(name.decode("ascii"))
    except (TypeError, UnicodeDecodeError) as err:
        raise CodecError(f"unknown dtype name {name!r} in an ndarray extension") from err


def _ndarray_to_bytes(arr: np.ndarray) -> bytes:
    if arr.dtype.hasobject or arr.dtype.isalignedstruct or arr.dtype.names is not None:
        raise CodecError(f"dtype {arr.dtype} cannot be encoded; FedJAX stores numeric arrays and bytes arrays only.")
    if arr.dtype.kind in "US":
        raise CodecError(
            f"dtype {arr.dtype} (fixed-width text) has no FedJAX encoding; store text as an object array of "
            "bytes, e.g. np.array([s.encode('utf-8') for s in texts], dtype=object).")
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return msgpack.packb((arr.shape, arr.dtype.name, arr.tobytes("C")), use_bin_type=True)


def _ndarray_from_bytes(data: bytes) -> np.ndarray:
    shape, dtype_name, buffer = msgpack.unpackb(data, raw=True)
    return np.frombuffer(buffer, dtype=_dtype_from_name(dtype_name)).reshape(shape, order="C")


def _bytes_ndarray_to_bytes(arr: np.ndarray) -> bytes:
    flat = list(arr.flatten())
    if flat and not isinstance(flat[0], bytes):
        raise CodecError(
            f"object arrays must hold bytes, got {type(flat[0]).__name__}; encode text first, "
            "e.g. np.array([s.encode('utf-8') for s in texts], dtype=object).")
    return msgpack.packb((arr.shape, flat), use_bin_type=True)


def _object_ndarray_from_bytes(data: bytes) -> np.ndarray:
    shape, flat = msgpack.unpackb(data, raw=True)
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out.reshape(shape)


def _ext_pack(x):
    if isinstance(x, np.ndarray) and x.dtype.hasobject:
        return msgpack.ExtType(EXT_BYTES_NDARRAY, _bytes_ndarray_to_bytes(x))
    if isinstance(x, np.ndarray):
        return msgpack.ExtType(EXT_NDARRAY, _ndarray_to_bytes(x))
    if isinstance(x, (np.generic, complex)):
        return msgpack.ExtType(EXT_NPSCALAR, _ndarray_to_bytes(np.asarray(x)))
    if hasattr(x, "__array__"):  # jax.Array and friends
        return _ext_pack(np.asarray(x))
    raise CodecError(f"cannot encode a value of type {type(x).__name__}; use numpy arrays, bytes, str, int, float.")


def _ext_unpack(code: int, data: bytes):
    if code == EXT_NDARRAY:
        return _ndarray_from_bytes(data)
    if code == EXT_COMPLEX:
        real, imag = msgpack.unpackb(data)
        return complex(real, imag)
    if code == EXT_NPSCALAR:
        return _ndarray_from_bytes(data)[()]
    if code == EXT_BYTES_NDARRAY:
        return _object_ndarray_from_bytes(data)
    return msgpack.ExtType(code, data)


def msgpack_serialize(tree) -> bytes:
    """msgpack bytes of a tree of dicts/lists with array leaves (FedJAX ``msgpack_serialize``)."""
    return msgpack.packb(tree, default=_ext_pack, strict_types=True)


def msgpack_deserialize(blob: bytes):
    """Inverse of ``msgpack_serialize`` (FedJAX ``msgpack_deserialize``)."""
    return msgpack.unpackb(blob, ext_hook=_ext_unpack, raw=False)


def encode_examples(examples: Mapping[str, np.ndarray]) -> bytes:
    """``zlib(msgpack(examples))``: the ``data`` column of a FedJAX SQLite file."""
    return zlib.compress(msgpack_serialize({str(k): np.asarray(v) for k, v in examples.items()}))


def decode_examples(blob: bytes) -> dict[str, np.ndarray]:
    """Inverse of ``encode_examples``; raises ``CodecError`` on a corrupt blob."""
    try:
        tree = msgpack_deserialize(zlib.decompress(blob))
    except (zlib.error, ValueError, TypeError, msgpack.UnpackException) as err:
        raise CodecError(f"corrupt FedJAX client blob ({type(err).__name__}: {err})") from err
    if not isinstance(tree, dict):
        raise CodecError(f"a FedJAX client blob must hold a dict of features, got {type(tree).__name__}")
    return tree
