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

Decoding never unpickles: object arrays are built from msgpack values, and an
ndarray's declared shape and dtype must match its buffer before it is viewed.
``encode_object_array``/``decode_object_array`` store any object array of
msgpack-able items (bytes, str, numbers, None, ndarrays) the same way; the npz
format uses them for ragged and variable-length features.
"""

from __future__ import annotations

import math
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


class DecodedTooLarge(CodecError):
    """A compressed blob inflates to more than the caller's ``max_size``; it was not inflated further."""


def _dtype_from_name(name: bytes) -> np.dtype:
    if name == b"bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    try:
        dtype = np.dtype(name.decode("ascii"))
    except (AttributeError, TypeError, ValueError, UnicodeDecodeError) as err:
        raise CodecError(f"unknown dtype name {name!r} in an ndarray extension") from err
    if dtype.hasobject:
        raise CodecError(f"dtype {name!r} in an ndarray extension holds Python objects; only numeric dtypes are "
                         "read (object arrays use extension 4)")
    return dtype


def _checked_shape(shape, count: int | None, what: str) -> tuple[int, ...]:
    """``shape`` as a tuple of ints, which must be non-negative and (if ``count`` is known) hold ``count`` items."""
    if not isinstance(shape, (list, tuple)) or not all(type(d) is int and d >= 0 for d in shape):
        raise CodecError(f"{what}: shape {shape!r} is not a list of non-negative ints")
    shape = tuple(shape)
    if count is not None and math.prod(shape) != count:
        raise CodecError(f"{what}: shape {shape} holds {math.prod(shape)} items but the data holds {count}")
    return shape


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
    dtype = _dtype_from_name(dtype_name)
    if not isinstance(buffer, bytes):
        raise CodecError(f"ndarray extension holds a {type(buffer).__name__} where its bytes belong")
    shape = _checked_shape(shape, None, "ndarray extension")
    if math.prod(shape) * dtype.itemsize != len(buffer):
        raise CodecError(f"ndarray extension declares shape {shape} of {dtype} "
                         f"({math.prod(shape) * dtype.itemsize} bytes) but holds {len(buffer)} bytes")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order="C")


def _bytes_ndarray_to_bytes(arr: np.ndarray) -> bytes:
    flat = list(arr.flatten())
    if flat and not isinstance(flat[0], bytes):
        raise CodecError(
            f"object arrays must hold bytes, got {type(flat[0]).__name__}; encode text first, "
            "e.g. np.array([s.encode('utf-8') for s in texts], dtype=object).")
    return msgpack.packb((arr.shape, flat), use_bin_type=True)


def _object_ndarray_from_bytes(data: bytes) -> np.ndarray:
    shape, flat = msgpack.unpackb(data, raw=True)
    if not isinstance(flat, list) or not all(isinstance(v, bytes) for v in flat):
        raise CodecError("a bytes-array extension must hold a list of bytes")
    return _object_array(flat, _checked_shape(shape, len(flat), "bytes-array extension"))


def _object_array(items: list, shape: tuple[int, ...]) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    for i, v in enumerate(items):  # item by item: numpy must not broadcast list or array items
        out[i] = v
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


def _plain_item(v):
    if isinstance(v, np.str_):
        return str(v)
    if isinstance(v, np.bytes_):
        return bytes(v)
    return v


def encode_object_array(arr: np.ndarray) -> bytes:
    """msgpack bytes of an object array of bytes, str, numbers, None or ndarrays (e.g. ragged sequences)."""
    arr = np.asarray(arr)
    if arr.dtype != object:
        raise CodecError(f"encode_object_array takes dtype=object arrays, got {arr.dtype}")
    items = [_plain_item(v) for v in arr.ravel(order="C").tolist()]
    try:
        return msgpack_serialize({"shape": list(arr.shape), "items": items})
    except (OverflowError, TypeError, ValueError) as err:
        raise CodecError(f"an object array holds a value that cannot be stored without pickle ({err}); "
                         "use bytes, str, int, float, None or numeric arrays as items.") from err


def decode_object_array(blob: bytes) -> np.ndarray:
    """Inverse of ``encode_object_array``; raises ``CodecError`` on a corrupt blob."""
    try:
        tree = msgpack_deserialize(bytes(blob))
    except (ValueError, TypeError, msgpack.UnpackException) as err:
        raise CodecError(f"corrupt object-array blob ({type(err).__name__}: {err})") from err
    if not isinstance(tree, dict) or set(tree) != {"shape", "items"} or not isinstance(tree["items"], list):
        raise CodecError("an object-array blob must hold {'shape': [...], 'items': [...]}")
    return _object_array(tree["items"], _checked_shape(tree["shape"], len(tree["items"]), "object-array blob"))


def msgpack_serialize(tree) -> bytes:
    """msgpack bytes of a tree of dicts/lists with array leaves (FedJAX ``msgpack_serialize``)."""
    return msgpack.packb(tree, default=_ext_pack, strict_types=True)


def msgpack_deserialize(blob: bytes):
    """Inverse of ``msgpack_serialize`` (FedJAX ``msgpack_deserialize``)."""
    return msgpack.unpackb(blob, ext_hook=_ext_unpack, raw=False)


def encode_examples(examples: Mapping[str, np.ndarray]) -> bytes:
    """``zlib(msgpack(examples))``: the ``data`` column of a FedJAX SQLite file."""
    return zlib.compress(msgpack_serialize({str(k): np.asarray(v) for k, v in examples.items()}))


def inflate(blob: bytes, max_size: int | None = None) -> bytes:
    """``zlib.decompress(blob)``, never producing more than ``max_size`` bytes.

    The stream is inflated with ``decompressobj(...).decompress(blob, max_size + 1)``, so a blob that
    would inflate further (a decompression bomb) raises ``DecodedTooLarge`` having allocated at most
    ``max_size + 1`` bytes. A truncated stream raises ``zlib.error``, as ``zlib.decompress`` does.
    """
    if max_size is None:
        return zlib.decompress(blob)
    d = zlib.decompressobj()
    out = d.decompress(blob, max_size + 1)
    if len(out) > max_size:
        raise DecodedTooLarge(f"the blob ({len(blob)} bytes) inflates to more than {max_size} bytes")
    if not d.eof:
        raise zlib.error("Error -5 while decompressing data: incomplete or truncated stream")
    return out


def decode_examples(blob: bytes, max_size: int | None = None) -> dict[str, np.ndarray]:
    """Inverse of ``encode_examples``; raises ``CodecError`` on a corrupt blob.

    ``max_size`` bounds the decompressed bytes (``DecodedTooLarge`` beyond it, raised before more is
    inflated); ``None`` leaves them unbounded.
    """
    try:
        tree = msgpack_deserialize(inflate(bytes(blob), max_size))
    except CodecError:
        raise
    except (zlib.error, ValueError, TypeError, msgpack.UnpackException) as err:
        raise CodecError(f"corrupt FedJAX client blob ({type(err).__name__}: {err})") from err
    if not isinstance(tree, dict):
        raise CodecError(f"a FedJAX client blob must hold a dict of features, got {type(tree).__name__}")
    return tree
