"""``tf.train.Example`` protos read and written without TensorFlow.

Wire layout (``tensorflow/core/example/{example,feature}.proto``)::

    Example  { Features features = 1; }
    Features { map<string, Feature> feature = 1; }      # entries: key = 1, value = 2
    Feature  { oneof { BytesList bytes_list = 1; FloatList float_list = 2; Int64List int64_list = 3; } }
    BytesList { repeated bytes value = 1; }  FloatList { repeated float value = 1; }  Int64List { repeated int64 value = 1; }

Numeric lists are read packed or unpacked; they are written packed, as TensorFlow does.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

BYTES, FLOAT, INT64 = 1, 2, 3
KIND_NAMES = {BYTES: "bytes_list", FLOAT: "float_list", INT64: "int64_list"}


class ExampleParseError(ValueError):
    """A blob is not a valid serialized ``tf.train.Example``."""


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ExampleParseError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ExampleParseError("varint longer than 10 bytes")


def _fields(buf: bytes):
    """Yields ``(field_number, wire_type, value)``; value is an int or a bytes slice."""
    pos, n = 0, len(buf)
    while pos < n:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > n:
                raise ExampleParseError("length-delimited field runs past the end of the message")
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        else:
            raise ExampleParseError(f"unsupported wire type {wire} for field {field}")
        if pos > n:
            raise ExampleParseError("message is truncated")
        yield field, wire, value


def _decode_varints(payload: bytes) -> np.ndarray:
    b = np.frombuffer(payload, np.uint8)
    if b.size == 0:
        return np.zeros(0, np.int64)
    if b[-1] & 0x80:
        raise ExampleParseError("truncated packed int64 list")
    if not (b & 0x80).any():
        return b.astype(np.int64)
    last = (b & 0x80) == 0
    group = np.concatenate([[0], np.cumsum(last[:-1])])
    starts = np.flatnonzero(np.concatenate([[True], last[:-1]]))
    pos = np.arange(b.size) - starts[group]
    if pos.max() > 9:
        raise ExampleParseError("varint longer than 10 bytes in a packed int64 list")
    parts = (b & 0x7F).astype(np.uint64) << (7 * pos).astype(np.uint64)
    out = np.zeros(int(last.sum()), np.uint64)
    np.bitwise_or.at(out, group, parts)
    return out.view(np.int64)


def _parse_feature(buf: bytes) -> tuple[int, object]:
    kind, values = None, None
    for field, wire, payload in _fields(buf):
        if field not in KIND_NAMES or wire != 2:
            continue
        kind = field
        if field == BYTES:
            values = [bytes(v) for f, w, v in _fields(payload) if f == 1 and w == 2]
        elif field == FLOAT:
            chunks = []
            for f, w, v in _fields(payload):
                if f != 1:
                    continue
                if w not in (2, 5):  # packed, or one fixed32
                    raise ExampleParseError(f"float_list value with wire type {w}")
                if len(v) % 4:
                    raise ExampleParseError(f"float_list value with wire type {w} and {len(v)} bytes")
                chunks.append(np.frombuffer(v, "<f4"))
            values = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
        else:
            chunks = []
            for f, w, v in _fields(payload):
                if f != 1:
                    continue
                if w not in (0, 2):  # packed varints or one varint
                    raise ExampleParseError(f"int64_list value with wire type {w}")
                chunks.append(_decode_varints(v) if w == 2 else np.array([v], np.uint64).view(np.int64))
            values = np.concatenate(chunks) if chunks else np.zeros(0, np.int64)
    if kind is None:
        return FLOAT, np.zeros(0, np.float32)  # an empty Feature: no values
    return kind, values


def parse_example(blob: bytes) -> dict[str, tuple[int, object]]:
    """``{name: (kind, values)}``: kind is BYTES (list of bytes), FLOAT (float32) or INT64 (int64)."""
    out = {}
    try:
        for field, wire, features in _fields(blob):
            if field != 1 or wire != 2:
                continue
            for f, w, entry in _fields(features):
                if f != 1 or w != 2:
                    continue
                key, value = None, b""
                for ef, ew, ev in _fields(entry):
                    if ef == 1 and ew == 2:
                        key = bytes(ev).decode("utf-8")
                    elif ef == 2 and ew == 2:
                        value = ev
                if key is None:
                    raise ExampleParseError("feature map entry without a key")
                out[key] = _parse_feature(value)
    except (ExampleParseError, UnicodeDecodeError) as err:
        raise ExampleParseError(f"not a valid tf.train.Example ({err})") from err
    return out


def _key(field: int, wire: int) -> bytes:
    return _encode_varint((field << 3) | wire)


def _encode_varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _delimited(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _encode_varint(len(payload)) + payload


def _encode_int64s(values: np.ndarray) -> bytes:
    v = values.astype(np.int64, copy=False).ravel()
    if v.size and v.min() >= 0 and v.max() < 128:
        return v.astype(np.uint8).tobytes()
    return b"".join(_encode_varint(int(x)) for x in v)


def feature_kind(values: np.ndarray) -> int:
    """Which list a numpy array is stored in: floats -> FLOAT, ints/bools -> INT64, bytes/str -> BYTES."""
    kind = values.dtype.kind
    if kind in "fc" or values.dtype.name == "bfloat16" or kind == "V" and values.dtype.itemsize == 2:
        return FLOAT
    if kind in "iub":
        return INT64
    if kind in "OSU":
        return BYTES
    raise TypeError(f"dtype {values.dtype} has no tf.train.Example encoding")


def serialize_example(features: Mapping[str, np.ndarray]) -> bytes:
    """Serialized ``tf.train.Example`` of one example's features (each flattened)."""
    entries = []
    for name, value in features.items():
        arr = np.asarray(value)
        kind = feature_kind(arr)
        if kind == FLOAT:
            payload = _delimited(1, arr.astype("<f4").ravel().tobytes())
        elif kind == INT64:
            payload = _delimited(1, _encode_int64s(arr))
        else:
            items = [v if isinstance(v, bytes) else str(v).encode("utf-8") for v in arr.ravel().tolist()]
            payload = b"".join(_delimited(1, v) for v in items)
        feature = _delimited(kind, payload)
        entries.append(_delimited(1, _delimited(1, name.encode("utf-8")) + _delimited(2, feature)))
    return _delimited(1, b"".join(entries))
